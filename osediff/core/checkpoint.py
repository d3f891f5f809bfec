"""OSEDiff weight files: the authors' `osediff.pkl` (spec §3) and our slim safetensors, both read into one
`OSEDiffWeights` value; `convert` turns one into the other.

The pickle is read with `torch.load(weights_only=True)`, which never runs code from the file. Our format keeps
the same tensors under the same peft key names (prefixed `unet.` / `vae.`) plus a JSON header in the
safetensors metadata, so a round trip pkl -> safetensors -> pkl is lossless.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from osediff.files.atomic import atomic_path
from osediff.weights.layout import AUTHORS_KEYS, AUTHORS_LIST_KEYS

FORMAT = "osediff"
FORMAT_VERSION = "1"
_UNET_LIST_KEYS = AUTHORS_LIST_KEYS


@dataclass(frozen=True)
class OSEDiffWeights:
    """What OSEDiff trains (spec §3.1): UNet LoRA (three adapters) + full `conv_in`, VAE-encoder LoRA.

    `unet_state` holds `<module>.lora_{A,B}.<adapter>.weight` and `conv_in.base_layer.{weight,bias}`;
    `vae_state` holds `<module>.lora_{A,B}.default_encoder.weight`. Tensors are on the CPU.
    """

    unet_targets: dict[str, list[str]]
    vae_targets: list[str]  # as stored by the reference, duplicates included
    rank_unet: int
    rank_vae: int
    unet_state: dict[str, torch.Tensor]
    vae_state: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_authors_dict(self) -> dict[str, Any]:
        """The plain dict that the reference's `save_model` pickles (spec §3.1)."""
        d: dict[str, Any] = {"vae_lora_encoder_modules": list(self.vae_targets)}
        for adapter, key in _UNET_LIST_KEYS.items():
            d[key] = list(self.unet_targets[adapter])
        d.update(rank_unet=self.rank_unet, rank_vae=self.rank_vae, state_dict_unet=dict(self.unet_state),
                 state_dict_vae=dict(self.vae_state))
        return d


def from_authors_dict(d: dict[str, Any], source: str = "<dict>") -> OSEDiffWeights:
    missing = [k for k in AUTHORS_KEYS if k not in d]
    if missing:
        raise ValueError(f"{source} is not an OSEDiff checkpoint: keys {missing} are missing "
                         "(expected the format of the authors' osediff.pkl, spec §3.1)")
    cpu = {k: v.detach().to("cpu") for k, v in d["state_dict_unet"].items()}
    return OSEDiffWeights(
        unet_targets={a: list(d[k]) for a, k in _UNET_LIST_KEYS.items()},
        vae_targets=list(d["vae_lora_encoder_modules"]),
        rank_unet=int(d["rank_unet"]), rank_vae=int(d["rank_vae"]), unet_state=cpu,
        vae_state={k: v.detach().to("cpu") for k, v in d["state_dict_vae"].items()})


def load_weights(path: str | os.PathLike) -> OSEDiffWeights:
    """Read `osediff.pkl` (authors' format) or our `.safetensors`; the format is detected from the content."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"OSEDiff weights not found: {path}. Download osediff.pkl from the authors' release "
            "(GitHub cswry/OSEDiff, file preset/models/osediff.pkl, linked from its README) and pass it with "
            "--weights PATH (or set OSEDIFF_WEIGHTS).")
    with open(path, "rb") as f:
        head = f.read(16)
    # safetensors starts with an 8-byte little-endian header length followed by '{'.
    if len(head) > 8 and head[8:9] == b"{":
        return _load_safetensors(path)
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} could not be read as an OSEDiff checkpoint (pickle, weights only): {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not an OSEDiff checkpoint (top level is {type(d).__name__}, not dict)")
    return from_authors_dict(d, str(path))


def _load_safetensors(path: Path) -> OSEDiffWeights:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is a safetensors file but not an osediff checkpoint (metadata format="
                             f"{meta.get('format')!r}); convert the authors' pkl with `osediff convert`.")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    header = json.loads(meta["osediff"])
    return OSEDiffWeights(
        unet_targets=header["unet_targets"], vae_targets=header["vae_targets"], rank_unet=header["rank_unet"],
        rank_vae=header["rank_vae"],
        unet_state={k[5:]: v for k, v in tensors.items() if k.startswith("unet.")},
        vae_state={k[4:]: v for k, v in tensors.items() if k.startswith("vae.")},
        metadata=header.get("extra", {}))


def save_safetensors(w: OSEDiffWeights, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Write our slim format: the trained tensors + a JSON header (targets, ranks, α, config) in the metadata."""
    from safetensors.torch import save_file

    header = {"unet_targets": w.unet_targets, "vae_targets": w.vae_targets, "rank_unet": w.rank_unet,
              "rank_vae": w.rank_vae, "lora_alpha": 8, "extra": {**w.metadata, **(extra or {})}}
    tensors = {f"unet.{k}": v.contiguous() for k, v in w.unet_state.items()}
    tensors.update({f"vae.{k}": v.contiguous() for k, v in w.vae_state.items()})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "osediff": json.dumps(header)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def save_authors_pkl(w: OSEDiffWeights, path: str | os.PathLike) -> None:
    """Write the authors' format (spec §3.1), readable by their `load_ckpt` and by `load_weights`."""
    d = w.to_authors_dict()
    with atomic_path(path) as tmp:
        torch.save(d, tmp)


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> OSEDiffWeights:
    """`osediff convert`: pkl <-> safetensors, by the destination's suffix (.safetensors, else pkl)."""
    w = load_weights(src)
    if str(dst).endswith(".safetensors"):
        save_safetensors(w, dst, extra={"converted_from": Path(src).name})
    else:
        save_authors_pkl(w, dst)
    return w
