"""Shared fixtures: a tiny random SD-2.1-base-like folder and an authors'-format osediff.pkl, built once per
session in a temporary folder (no network, a few seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    from osediff.testing import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("sd21-tiny"))


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_sd, tmp_path_factory) -> Path:
    from osediff.testing import make_authors_checkpoint

    return make_authors_checkpoint(tiny_sd, tmp_path_factory.mktemp("ckpt") / "osediff.pkl")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_sd, tiny_ckpt):
    from osediff.core.pipeline import OSEDiffPipeline

    return OSEDiffPipeline.from_pretrained(str(tiny_sd), str(tiny_ckpt), device="cpu", dtype="fp32", use_dape=False)


@pytest.fixture(scope="session")
def sr_args(tiny_sd, tiny_ckpt) -> list[str]:
    """`osediff sr` flags for the tiny model on the CPU. fp32: `--dtype auto` picks bf16 on CPUs with native bf16
    and fp32 elsewhere, and the tests must not depend on the machine."""
    return ["--base", str(tiny_sd), "--weights", str(tiny_ckpt), "--no-dape", "--device", "cpu", "--dtype", "fp32",
            "--process-size", "64"]


@pytest.fixture(autouse=True)
def _empty_hf_cache(tmp_path_factory, monkeypatch):
    """SD 2.1-base is looked for in the Hugging Face cache before any download: every test sees an empty cache
    (never the machine's own) unless it builds one."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.getbasetemp() / "hf-hub-cache-empty"))
