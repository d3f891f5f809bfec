"""SD 2.1-base already in the Hugging Face cache: found offline, so nobody downloads 5 GB twice.

diffusers keeps what it fetched under `$HF_HUB_CACHE` (default `$HF_HOME/hub`, `~/.cache/huggingface/hub`) as
`models--<org>--<name>/refs/main` (the commit of `main`) and `snapshots/<commit>/<files>` (links into `blobs/`).
Looked at, in order: the repos of `REPOS`, `main`'s snapshot first, then the others, newest first. A snapshot
counts as
- a diffusers folder when unet, vae, text_encoder and tokenizer are all there with their configs and a weight
  file each (fp32, or the `*.fp16.safetensors` variants) that really exists (a cut download leaves a snapshot
  without some files, or links to missing blobs) and passes the structural check; else
- one of the published single files at its root (`v2-1_512-ema-pruned.safetensors`, ...).
Nothing here touches the network; the caller logs where the weights came from.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from osediff.weights.locate import SD_MIRRORS

log = logging.getLogger(__name__)

REPOS = ("stabilityai/stable-diffusion-2-1-base", *SD_MIRRORS)
# the names each network's weights may have in a diffusers repo, fp32 first
WEIGHT_NAMES = {"unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                         "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
                "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                        "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
                "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin",
                                 "pytorch_model.fp16.bin")}
CONFIGS = ("unet/config.json", "vae/config.json", "text_encoder/config.json")


@dataclass(frozen=True)
class CacheHit:
    """SD 2.1-base found in the cache: `path` (a snapshot folder or a single file) from `repo` at `revision`."""

    path: str
    repo: str
    revision: str
    form: str  # "diffusers folder" or "single file"

    def describe(self) -> str:
        return f"the Hugging Face cache ({self.repo}, {self.form}, revision {self.revision[:12]}): {self.path}"


def hub_cache() -> Path:
    """Where huggingface_hub keeps its cache, read from the environment at call time."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def snapshots(repo: str, cache: Path | None = None) -> list[Path]:
    """The cached snapshots of a model repo: `main`'s first, then the others, newest first."""
    root = (cache or hub_cache()) / f"models--{repo.replace('/', '--')}"
    snaps = root / "snapshots"
    if not snaps.is_dir():
        return []
    found = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    ref = root / "refs" / "main"
    main = snaps / ref.read_text().strip() if ref.is_file() else None
    return ([main] if main in found else []) + [p for p in found if p != main]


def missing_parts(snap: Path) -> list[str]:
    """What a diffusers SD snapshot lacks (configs, tokenizer files, one existing weight file per network)."""
    missing = [c for c in CONFIGS if not (snap / c).is_file()]
    tok = snap / "tokenizer"
    if not ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()):
        missing.append("tokenizer/vocab.json+merges.txt")
    for sub, names in WEIGHT_NAMES.items():
        if not any((snap / sub / n).is_file() for n in names):  # is_file follows the link: a missing blob is False
            missing.append(f"{sub} weights")
    return missing


def _usable_folder(snap: Path) -> bool:
    from osediff.weights.check import BrokenWeightsError, check_base

    missing = missing_parts(snap)
    if missing:
        log.info("Hugging Face cache: %s is partial (no %s); not used", snap, ", ".join(missing))
        return False
    try:
        check_base(snap)
    except (BrokenWeightsError, OSError) as e:
        log.info("Hugging Face cache: %s not used: %s", snap, e)
        return False
    return True


def _usable_file(snap: Path) -> Path | None:
    from osediff.weights.single_file import PUBLISHED_NAMES, looks_like_sd21_base

    for name in PUBLISHED_NAMES:
        p = snap / name
        if p.is_file() and looks_like_sd21_base(p):
            return p
    return None


def find_base(cache: Path | None = None) -> CacheHit | None:
    """SD 2.1-base in the Hugging Face cache (see the module docstring), or None. Offline: reads the disk only."""
    cache = cache or hub_cache()
    if not cache.is_dir():
        return None
    for repo in REPOS:
        for snap in snapshots(repo, cache):
            if (snap / "unet").is_dir() and _usable_folder(snap):
                return CacheHit(str(snap), repo, snap.name, "diffusers folder")
            f = _usable_file(snap)
            if f is not None:
                return CacheHit(str(f), repo, snap.name, "single file")
    return None
