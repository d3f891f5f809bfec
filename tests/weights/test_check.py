"""The structural check on tiny random weights: good files pass, and truncated files, wrong keys, a file of one kind
in another's place, LoRA for another base and the SD 2.1 (768, v-prediction) configs are each BROKEN with a reason.
The CLI's `--check` prints one line per weight and exits non-zero when anything is missing or broken."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from osediff.cli import main
from osediff.weights import check, layout
from osediff.weights.check import BrokenWeightsError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dape"))
import test_dape  # noqa: E402 - the tiny RAM/DAPE builders of the tagger tests


@pytest.fixture(scope="module")
def ram_dape(tmp_path_factory):
    d = tmp_path_factory.mktemp("ram")
    weights = test_dape.random_weights(0)
    ram = test_dape.save_ram(d, test_dape.published(weights), "ram_swin_large_14m.pth")
    dape = d / "DAPE.pth"
    torch.save(test_dape.random_lora(weights), dape)
    return ram, dape


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) * 2 // 3])
    return dst


def _edited_pkl(src: Path, dst: Path, edit) -> Path:
    d = torch.load(src, weights_only=True)
    edit(d)
    torch.save(d, dst)
    return dst


def _copy_sd(tiny_sd: Path, dst: Path) -> Path:
    shutil.copytree(tiny_sd, dst)
    return dst


def test_good_tiny_files_pass(tiny_sd, tiny_ckpt, ram_dape, tmp_path):
    check.check_base(tiny_sd)
    check.check_osediff(tiny_ckpt, tiny_sd)
    check.check_ram(ram_dape[0])
    check.check_dape(ram_dape[1])
    st = tmp_path / "osediff.safetensors"
    from osediff.core.checkpoint import convert

    convert(tiny_ckpt, st)
    check.check_osediff(st, tiny_sd)
    v = check.check("weights", tiny_ckpt, tiny_sd, published_sha1=check.blob_sha1(tiny_ckpt))
    assert v.status == "ok (published)"
    assert check.check("weights", tiny_ckpt, tiny_sd, published_sha1="0" * 40).status == "ok (custom)"


def test_blob_sha1_is_gits(tmp_path):
    p = tmp_path / "hello"
    p.write_bytes(b"hello\n")
    assert check.blob_sha1(p) == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object` of "hello\n"


def test_truncated_files_are_broken(tiny_sd, tiny_ckpt, ram_dape, tmp_path):
    for key, src in (("weights", tiny_ckpt), ("ram", ram_dape[0]), ("dape", ram_dape[1])):
        v = check.check(key, _truncated(src, tmp_path / src.name), tiny_sd)
        assert v.status.startswith("BROKEN: ") and "truncated" in v.status, v.status
    base = _copy_sd(tiny_sd, tmp_path / "sd")
    _truncated(tiny_sd / "vae" / "diffusion_pytorch_model.safetensors", base / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(BrokenWeightsError, match="truncated"):
        check.check_base(base)


def test_wrong_keys_are_broken(tiny_sd, tiny_ckpt, tmp_path):
    def drop(d):
        d["state_dict_unet"].pop(next(k for k in d["state_dict_unet"] if "lora_B.default_decoder" in k))

    def rename(d):
        d["state_dict_vae"] = {k.replace("default_encoder", "default"): v for k, v in d["state_dict_vae"].items()}

    def rank(d):
        d["rank_unet"] = 8

    for edit, why in ((drop, "lacks 1"), (rename, "unexpected"), (rank, "rank 8")):
        bad = _edited_pkl(tiny_ckpt, tmp_path / f"{edit.__name__}.pkl", edit)
        with pytest.raises(BrokenWeightsError, match=why):
            check.check_osediff(bad, tiny_sd)
    ram = tmp_path / "ram.pth"
    sd = test_dape.published(test_dape.random_weights(0))
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith("vision_multi")}}, ram)
    with pytest.raises(BrokenWeightsError, match="lacks RAM tagging weights"):
        check.check_ram(ram)
    half = {k: v for k, v in test_dape.random_lora(test_dape.random_weights(0)).items() if not k.endswith("lora_B")}
    torch.save(half, tmp_path / "dape.pth")
    with pytest.raises(BrokenWeightsError, match="incomplete"):
        check.check_dape(tmp_path / "dape.pth")


def test_a_file_of_one_kind_in_anothers_place(tiny_ckpt, ram_dape):
    ram, dape = ram_dape
    assert "looks like OSEDiff weights" in check.check("ram", tiny_ckpt).status
    assert "looks like a RAM checkpoint" in check.check("dape", ram).status
    assert "looks like DAPE.pth" in check.check("weights", dape).status
    assert "not a RAM checkpoint" in check.check("ram", dape).status
    assert check.check("base", tiny_ckpt).status.startswith("BROKEN")


def test_sd21_768_v_prediction_is_not_the_base(tiny_sd, tmp_path):
    base = _copy_sd(tiny_sd, tmp_path / "sd21")
    cfg = json.loads((base / "unet" / "config.json").read_text())
    (base / "unet" / "config.json").write_text(json.dumps({**cfg, "sample_size": 96}))
    with pytest.raises(BrokenWeightsError, match="768 px, v-prediction"):
        check.check_base(base)
    (base / "unet" / "config.json").write_text(json.dumps(cfg))
    sched = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sched, "prediction_type": "v_prediction"}))
    with pytest.raises(BrokenWeightsError, match="SD 2.1-base"):
        check.check_base(base)


def test_a_config_that_does_not_describe_its_weights(tiny_sd, tmp_path):
    base = _copy_sd(tiny_sd, tmp_path / "sd")
    cfg = json.loads((base / "vae" / "config.json").read_text())
    (base / "vae" / "config.json").write_text(json.dumps({**cfg, "layers_per_block": 2}))
    with pytest.raises(BrokenWeightsError, match="lacks"):
        check.check_base(base)


def test_lora_for_another_base_is_caught(tiny_sd, tiny_ckpt, tmp_path):
    from diffusers import UNet2DConditionModel

    from osediff.testing import TINY_UNET

    base = _copy_sd(tiny_sd, tmp_path / "other")
    UNet2DConditionModel(**dict(TINY_UNET, block_out_channels=(16, 64), norm_num_groups=8)).save_pretrained(
        base / "unet")
    check.check_base(base)  # a fine base of its own
    with pytest.raises(BrokenWeightsError, match="SD 2.1-base"):
        check.check_osediff(tiny_ckpt, base)


def test_layout_counts_and_ram_names_match_the_models():
    """The check's data agrees with the models it describes: SD 2.1-base's target counts (spec App. A), and
    the RAM tensor names that `RAMTagger` loads."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from osediff.dape import RAMTagger
    from osediff.testing import SD21_UNET, SD21_VAE

    with torch.device("meta"):
        unet, vae, tagger = UNet2DConditionModel(**SD21_UNET), AutoencoderKL(**SD21_VAE), RAMTagger()
    counts = {a: len(m) for a, m in layout.unet_targets(n for n, _ in unet.named_parameters()).items()}
    vae_t = layout.vae_targets(n for n, _ in vae.named_parameters())
    assert {**counts, "vae_raw": len(vae_t), "vae_unique": len(set(vae_t))} == layout.SD21_BASE_COUNTS
    names = set(tagger.state_dict())
    assert set(check.RAM_TENSORS) <= names and {f"tagging_head.{k}" for k in check.RAM_HEAD} <= names


def test_cli_check_prints_one_line_per_weight(tiny_sd, tiny_ckpt, ram_dape, tmp_path, capsys, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(tiny_sd, models / "stable-diffusion-2-1-base")
    shutil.copy(tiny_ckpt, models / "osediff.pkl")
    shutil.copy(ram_dape[0], models / "ram_swin_large_14m.pth")
    _truncated(ram_dape[1], models / "DAPE.pth")
    monkeypatch.delenv("OSEDIFF_WEIGHTS", raising=False)
    assert main(["download", "all", "--check", "--models", str(models)]) == 1
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["base"].startswith("ok (no published checksum)")
    assert lines["weights"].startswith("ok (custom)")  # random LoRA: right structure, not the published file
    assert lines["ram"].startswith("ok")
    assert lines["dape"].startswith("BROKEN: ") and "truncated" in lines["dape"]
    assert lines["face"].startswith("MISSING")
    (models / "DAPE.pth").unlink()
    shutil.copy(ram_dape[1], models / "DAPE.pth")
    assert main(["download", "--check", "--models", str(models)]) == 0


def test_loading_a_broken_file_gives_the_one_line_reason(tiny_sd, tiny_ckpt, tmp_path, caplog):
    import numpy as np
    from PIL import Image

    from osediff.core.pipeline import OSEDiffPipeline

    bad = _truncated(tiny_ckpt, tmp_path / "osediff.pkl")
    with pytest.raises(BrokenWeightsError, match="is broken: osediff.pkl is truncated"):
        OSEDiffPipeline.from_pretrained(str(tiny_sd), str(bad), device="cpu", dtype="fp32", use_dape=False)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    rc = main(["sr", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--base", str(tiny_sd), "--weights",
               str(bad), "--no-dape"])
    assert rc == 2 and "truncated" in caplog.text and "Traceback" not in caplog.text
