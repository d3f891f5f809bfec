"""OSEDiff's LoRA: which modules carry it (spec §2.2, §2.3) and the exact merge math (spec §3.3).

Two ways to run the published weights, which compute the same function:
- merged (default): ΔW is added into the base weights once at load (`merged_weight`, applied by `osediff.core.build.merge_edits`), no peft at run time;
- unmerged: peft adapters named as the reference names them (`add_unet_adapters`, `add_vae_adapter`), used for
  training and to prove the merge is exact (`tests/test_lora.py`).
The reference never sets `lora_alpha`, so peft's default α=8 applies: scaling = 8/rank (2.0 at rank 4).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn

from osediff.weights import layout
from osediff.weights.layout import LORA_ALPHA, UNET_ADAPTERS, VAE_ADAPTER, unique  # noqa: F401 - re-exported


def unet_lora_targets(unet: nn.Module) -> dict[str, list[str]]:
    """The generator UNet's LoRA targets split into the three reference adapters (spec §2.2, Appendix A).

    Returns {"default_encoder": [...94], "default_decoder": [...148], "default_others": [...16]} for SD 2.1-base,
    in `named_parameters()` order (the order the checkpoint stores). The rule is `weights.layout.unet_targets`.
    """
    return layout.unet_targets(name for name, _ in unet.named_parameters())


def vae_lora_targets(vae: nn.Module) -> list[str]:
    """The VAE-encoder LoRA target list exactly as the reference stores it: 65 entries with duplicates for
    SD 2.1-base, 32 unique modules (spec §2.3, Appendix A.1). Use `unique()` for the module set."""
    return layout.vae_targets(name for name, _ in vae.named_parameters())


def scaling(rank: int) -> float:
    """peft's LoRA scale α/r with the reference's implicit α = 8 (spec §2.2)."""
    return LORA_ALPHA / rank


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = scale · B·A for Linear (A [r,in], B [out,r]) and Conv (A [r,in,k,k], B [out,r,1,1]) (spec §3.3).

    Computed in float32 (adding it to an fp32 weight then costs one more rounding of ~1e-7 relative; float64
    made loading the full UNet ~10 s slower on a CPU).
    """
    a, b = lora_a.float(), lora_b.float()
    if a.ndim == 2:
        return scale * (b @ a)
    return scale * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)


def lora_pair(lora_state: Mapping[str, torch.Tensor], name: str, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of module `name` (keys `<module>.lora_A.<adapter>.weight` / `lora_B`); KeyError names the module."""
    try:
        return lora_state[f"{name}.lora_A.{adapter}.weight"], lora_state[f"{name}.lora_B.{adapter}.weight"]
    except KeyError as e:
        raise KeyError(f"LoRA weights for module {name!r} (adapter {adapter}) missing from the checkpoint") from e


def merged_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rank: int, name: str = "") -> torch.Tensor:
    """W + ΔW (spec §3.3), added in float32 and returned in w's dtype and device."""
    delta = lora_delta(a, b, scaling(rank))
    if delta.shape != w.shape:
        raise ValueError(f"LoRA shape mismatch for {name}: A {tuple(a.shape)}, B {tuple(b.shape)}, "
                         f"weight {tuple(w.shape)}; is the base model SD 2.1-base?")
    return (w.float() + delta.to(w.device)).to(w.dtype)


def _config(rank: int, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian", target_modules=unique(targets))


def add_unet_adapters(unet: nn.Module, targets: Mapping[str, list[str]], rank: int) -> None:
    """Wrap the UNet with the three reference peft adapters and activate all of them (spec §2.2, §3.2)."""
    with warnings.catch_warnings():
        # peft warns that a second adapter joins the first: that is exactly the reference's layout.
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        for adapter in UNET_ADAPTERS:
            unet.add_adapter(_config(rank, targets[adapter]), adapter_name=adapter)
    unet.set_adapter(list(UNET_ADAPTERS))


def add_vae_adapter(vae: nn.Module, targets: list[str], rank: int) -> None:
    """Wrap the VAE encoder (+ quant_conv) with the reference's single adapter (spec §2.3)."""
    vae.add_adapter(_config(rank, targets), adapter_name=VAE_ADAPTER)
    vae.set_adapter([VAE_ADAPTER])


def copy_lora_state(model: nn.Module, state: Mapping[str, torch.Tensor], include: tuple[str, ...]) -> None:
    """The reference's `load_ckpt` copy: every parameter whose name contains one of `include` is copied from
    `state` (KeyError names any missing key), as in spec §3.2 step 2."""
    missing = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in include):
                if name not in state:
                    missing.append(name)
                    continue
                p.copy_(state[name].to(p.dtype))
    if missing:
        raise KeyError(f"{len(missing)} parameters missing from the checkpoint, e.g. {missing[:3]}")


def lora_state(model: nn.Module, include: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The reference's save filter (spec §3.1): state_dict items whose key contains one of `include`."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if any(s in k for s in include)}
