"""Where each weight comes from: what it is, its published source(s), its size and, where known, its checksum.

Sources are tried in order; a later one is a fallback for an earlier one that is unreachable or gone. Base URLs
can be redirected by environment variables (a mirror, a proxy, or a loopback server in the tests):

| variable | default | used for |
|---|---|---|
| `OSEDIFF_GITHUB_URL` | `https://raw.githubusercontent.com/cswry/OSEDiff/main/preset/models` | osediff.pkl, osediff_face.pkl |
| `OSEDIFF_GDRIVE_URL` | `https://drive.google.com/uc?export=download` | DAPE.pth |
| `HF_ENDPOINT` | `https://huggingface.co` (read by huggingface_hub) | SD 2.1-base, RAM |

Sizes: SD 2.1-base is stated from its architecture (spec §2.1: 865,910,724 + 83,653,863 UNet/VAE parameters,
plus the 23-layer CLIP text tower), in fp32; a mirror that only has fp16 files halves it. The others are not
stated here because they could not be confirmed on a machine without network: the download reports the
size the server announces.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from osediff.weights.locate import SD_MIRRORS as SD_REPOS

GITHUB_RAW = "https://raw.githubusercontent.com/cswry/OSEDiff/main/preset/models"
GDRIVE = "https://drive.google.com/uc?export=download"

SD_CONFIGS = ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
              "text_encoder/config.json")
SD_TOKENIZER = "tokenizer/"
# one safetensors file per network; the first name a mirror has wins (fp32 before fp16)
SD_WEIGHTS = {"unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
              "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
              "text_encoder": ("model.safetensors", "model.fp16.safetensors")}


@dataclass(frozen=True)
class HFFile:
    """One file of a Hugging Face repository (model or space)."""

    repo: str
    filename: str
    repo_type: str = "model"


@dataclass(frozen=True)
class URLFile:
    """A file behind a plain HTTP(S) URL; `kind` "gdrive" adds Google Drive's large-file confirmation step."""

    url: str
    kind: str = "http"


@dataclass(frozen=True)
class Source:
    key: str  # the weight key of `locate.SPECS`
    name: str  # file or folder name in the models folder
    what: str
    origins: tuple  # HFFile | URLFile | "hf-snapshot", tried in order
    size: int | None = None  # bytes, where known (see the module docstring)
    blob_sha1: str | None = None  # git blob id of the published file, where published in git


def _github(name: str) -> URLFile:
    return URLFile(f"{os.environ.get('OSEDIFF_GITHUB_URL', GITHUB_RAW).rstrip('/')}/{name}")


def _gdrive(file_id: str) -> URLFile:
    base = os.environ.get("OSEDIFF_GDRIVE_URL", GDRIVE)
    return URLFile(f"{base}{'&' if '?' in base else '?'}id={file_id}", kind="gdrive")


DAPE_DRIVE_ID = "1KIV6VewwO2eDC9g4Gcvgm-a0LDI7Lmwm"
# SD 2.1-base fp32 safetensors as written by diffusers/transformers for the spec §2.1 architecture
SD21_BASE_BYTES = 3_463_726_504 + 334_643_268 + 1_361_592_216


def sources() -> dict[str, Source]:
    """Every downloadable weight by key; built on call so the URL variables are read when used."""
    return {
        "base": Source("base", "stable-diffusion-2-1-base", "Stable Diffusion 2.1-base (unet, vae, text encoder, "
                       "tokenizer)", tuple(f"hf-snapshot:{r}" for r in SD_REPOS), size=SD21_BASE_BYTES),
        "weights": Source("weights", "osediff.pkl", "OSEDiff weights", (_github("osediff.pkl"),),
                          blob_sha1="bc84dc9729aa6173e8b1087977025a4fc566a5db"),
        "face": Source("face", "osediff_face.pkl", "OSEDiff face weights", (_github("osediff_face.pkl"),),
                       blob_sha1="4465e04da247be8f9af700f8cafbbd906439430c"),
        "ram": Source("ram", "ram_swin_large_14m.pth", "RAM Swin-L tagger",
                      (HFFile("xinyu1205/recognize_anything_model", "ram_swin_large_14m.pth"),
                       HFFile("xinyu1205/recognize-anything", "ram_swin_large_14m.pth", "space"))),
        "dape": Source("dape", "DAPE.pth", "DAPE prompt-extractor LoRA", (_gdrive(DAPE_DRIVE_ID),)),
    }


DEFAULT_KEYS = ("base", "weights", "ram", "dape")  # what `osediff sr` needs
ALL_KEYS = ("base", "weights", "ram", "dape", "face")


def describe(origin) -> str:
    if isinstance(origin, HFFile):
        return f"huggingface.co {'space ' if origin.repo_type == 'space' else ''}{origin.repo}/{origin.filename}"
    if isinstance(origin, URLFile):
        return origin.url
    return f"huggingface.co {str(origin).split(':', 1)[1]}"


def human(n: int | None) -> str:
    if n is None:
        return "size unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
