import pickle

import pytest
import torch

from osediff.core.checkpoint import convert, load_weights, save_authors_pkl


def test_authors_pkl_is_read_with_its_exact_layout(tiny_ckpt):
    raw = torch.load(tiny_ckpt, weights_only=True)
    assert set(raw) == {"vae_lora_encoder_modules", "unet_lora_encoder_modules", "unet_lora_decoder_modules",
                        "unet_lora_others_modules", "rank_unet", "rank_vae", "state_dict_unet", "state_dict_vae"}
    w = load_weights(tiny_ckpt)
    assert w.rank_unet == 4 and w.rank_vae == 4
    assert w.vae_targets == raw["vae_lora_encoder_modules"] and len(set(w.vae_targets)) < len(w.vae_targets)
    assert "conv_in.base_layer.weight" in w.unet_state and "conv_in.base_layer.bias" in w.unet_state
    assert any(k.endswith(".lora_A.default_others.weight") for k in w.unet_state)
    assert all(k.endswith(".default_encoder.weight") for k in w.vae_state)


def test_round_trip_pkl_safetensors_pkl_is_lossless(tiny_ckpt, tmp_path):
    st = tmp_path / "o.safetensors"
    convert(tiny_ckpt, st)
    back = tmp_path / "back.pkl"
    convert(st, back)
    a, b = torch.load(tiny_ckpt, weights_only=True), torch.load(back, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith("state_dict"):
            assert a[k].keys() == b[k].keys()
            assert all(torch.equal(a[k][n], b[k][n]) for n in a[k])
        else:
            assert a[k] == b[k]
    from safetensors import safe_open

    with safe_open(str(st), "pt") as f:
        assert f.metadata()["format"] == "osediff"


def test_safetensors_and_pkl_give_the_same_model(tiny_sd, tiny_ckpt, tmp_path):
    from osediff.core.model import OSEDiffModel

    st = tmp_path / "o.safetensors"
    convert(tiny_ckpt, st)
    m1 = OSEDiffModel.from_pretrained(str(tiny_sd), str(tiny_ckpt))
    m2 = OSEDiffModel.from_pretrained(str(tiny_sd), str(st))
    for (n, p), (_, q) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(p, q), n


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_carrying_code_are_refused(tmp_path):
    p = tmp_path / "evil.pkl"
    torch.save({"x": _Evil()}, p)
    with pytest.raises(ValueError, match="could not be read"):
        load_weights(p)


def test_wrong_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--weights"):
        load_weights(tmp_path / "nope.pkl")
    p = tmp_path / "other.pkl"
    torch.save({"model": {}}, p)
    with pytest.raises(ValueError, match="not an OSEDiff checkpoint"):
        load_weights(p)
    q = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(q))
    with pytest.raises(ValueError, match="not an osediff checkpoint"):
        load_weights(q)
    t = tmp_path / "text.pkl"
    t.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError):
        load_weights(t)


def test_save_is_atomic(tiny_ckpt, tmp_path, monkeypatch):
    w = load_weights(tiny_ckpt)
    target = tmp_path / "out.pkl"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        save_authors_pkl(w, target)
    assert list(tmp_path.iterdir()) == []
