"""The plain-read safetensors reader returns exactly what the safetensors library returns."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from osediff.files.tensors import header, iter_tensors


def test_every_tensor_equals_the_library_read(tmp_path):
    g = torch.Generator().manual_seed(0)
    ts = {"w32": torch.randn(5, 7, generator=g), "w16": torch.randn(3, 2, 2, generator=g).half(),
          "wbf": torch.randn(9, generator=g).bfloat16(), "ids": torch.arange(77)[None], "flag": torch.tensor(True),
          "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    path = tmp_path / "m.safetensors"
    save_file(ts, str(path), metadata={"format": "pt"})
    ref = load_file(str(path))
    got = dict(iter_tensors(path))
    assert got.keys() == ref.keys() == set(header(path)[0])
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape and torch.equal(got[k], ref[k])
    assert list(dict(iter_tensors(path, names=["w16"]))) == ["w16"]


def test_a_truncated_file_is_an_error(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="ends inside"):
        list(iter_tensors(path))


def test_reused_scratch_buffer_gives_the_same_values(tmp_path):
    ts = {f"t{i}": torch.randn(i + 1, 3) for i in range(4)} | {"h": torch.randn(2, 2).half()}
    path = tmp_path / "m.safetensors"
    save_file(ts, str(path))
    got = {k: t.clone() for k, t in iter_tensors(path, reuse=True)}
    assert all(torch.equal(got[k], ts[k]) and got[k].dtype == ts[k].dtype for k in ts)
