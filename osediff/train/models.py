"""The three networks of OSEDiff training (spec §2, §2.5, §4.5), all built from one SD 2.1-base:

    G_θ      generator: VAE encoder + LoRA, UNet + LoRA (three adapters) + trainable conv_in, frozen decoder,
             fp32 master weights; trainable = LoRA + conv_in + VAE-encoder LoRA (4,436,908 params at full size)
    ε_real   the frozen SD UNet (the "real"/pretrained score), in the frozen dtype (fp16 in the reference), outside
             autocast with the reference placement (pure fp16, as the reference), under it with "frozen-dtype"
    ε_φ      the fake score: SD UNet + LoRA, fp32, conv_in frozen; mid-block LoRA only by default, which is what
             the reference trains (it never activates its other two adapters, spec §2.5, §8.15)

Each score is a module `(z_t, t, c) -> ε` (float32), so the losses can take them as plain functions.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from osediff.core import lora
from osediff.core.build import load_base
from osediff.core.checkpoint import OSEDiffWeights
from osediff.core.model import OSEDiffModel

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def frozen_dtype(name: str, mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen networks: `name`, or with "auto" the autocast dtype (fp32 without autocast)."""
    if name == "auto":
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    return DTYPES[name]


def set_trainable(module: nn.Module, patterns: tuple[str, ...]) -> list[nn.Parameter]:
    """Freeze `module` except parameters whose name contains one of `patterns`; returns those, in order."""
    out = []
    for name, p in module.named_parameters():
        p.requires_grad_(any(s in name for s in patterns))
        if p.requires_grad:
            out.append(p)
    return out


class Generator(nn.Module):
    """G_θ in training form (spec §4.5): `forward(x_L, c, generator) -> (ẑ_H, x̂_H)`.

    x_L (B, 3, H, W) in [-1, 1] (H, W multiples of 8), c (B, 77, D) -> the clean latent ẑ_H (B, 4, H/8, W/8)
    float32 and the decoded image x̂_H (B, 3, H, W) in [-1, 1]. The latent is a posterior *sample* drawn with
    `generator`, as in the reference; nothing is tiled. Gradients flow through the frozen decoder.

    `autocast_moments=True` (the reference placement) keeps the posterior moments in the dtype the encoder gave
    them, which under autocast is the autocast dtype, so the noise is drawn in it, as diffusers' `latent_dist`
    does inside the reference's autocast-wrapped forward; False casts them to fp32 first.
    """

    def __init__(self, model: OSEDiffModel, autocast_moments: bool = True):
        super().__init__()
        self.model, self.autocast_moments = model, autocast_moments

    def forward(self, x_L: torch.Tensor, c: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        side = max(x_L.shape[-2:])
        z_L = m.encode(x_L, sample=True, generator=generator, tile=side, cast_moments=not self.autocast_moments)
        z_hat = m.denoise(z_L, c.to(m.dtype), tile=side // 8)
        x_hat = m.decode(z_hat, tile=side // 8)
        return z_hat, x_hat


class ScoreUNet(nn.Module):
    """An SD UNet as a score `(z_t, t, c) -> ε` in float32, run in the UNet's own dtype.

    `autocast=False` keeps it out of any surrounding autocast: the reference runs the fake score in fp32 and the
    real one in pure fp16 because it calls them outside the autocast-wrapped forward (spec §4.6, "Precision").
    """

    def __init__(self, unet: nn.Module, autocast: bool = True):
        super().__init__()
        self.unet, self.autocast = unet, autocast

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.conv_out.weight.dtype
        with nullcontext() if self.autocast else torch.autocast(z_t.device.type, enabled=False):
            return self.unet(z_t.to(dtype), t, encoder_hidden_states=c.to(dtype)).sample.float()


@dataclass
class Networks:
    """What `build_networks` returns: the three networks and the LoRA layout a checkpoint records."""

    generator: Generator
    real: ScoreUNet
    fake: ScoreUNet
    unet_targets: dict[str, list[str]]
    vae_targets: list[str]
    rank: int


def build_networks(base: str, rank: int = 4, fake_lora: Literal["mid", "all"] = "mid",
                   frozen: torch.dtype = torch.float32, gradient_checkpointing: bool = False,
                   placement: Literal["reference", "frozen-dtype"] = "reference") -> Networks:
    """G_θ, ε_real and ε_φ from one SD 2.1-base, on the CPU (spec §2.2–§2.5).

    LoRA: rank `rank`, α = 8, Gaussian A, zero B, so at step 0 G_θ is SD at t=999 and ε_φ equals ε_real without
    CFG. Seed the global RNG first: the LoRA A matrices are drawn from it (generator UNet, VAE, then fake).
    `placement` (see `RunConfig.amp_placement`): "reference" keeps the text encoder fp32, runs ε_real outside
    autocast and samples the posterior in the autocast dtype; "frozen-dtype" casts the text encoder to `frozen`
    too, runs ε_real under autocast and samples in fp32.
    """
    unet, vae, text_encoder, tokenizer = load_base(base)
    unet_targets, vae_targets = lora.unet_lora_targets(unet), lora.vae_lora_targets(vae)
    real_unet = copy.deepcopy(unet).requires_grad_(False).eval()
    reference = placement == "reference"
    if frozen != torch.float32:
        real_unet.to(frozen)
        if not reference:
            text_encoder.to(frozen)
    fake_unet = copy.deepcopy(unet)

    lora.add_unet_adapters(unet, unet_targets, rank)
    lora.add_vae_adapter(vae, vae_targets, rank)
    model = OSEDiffModel(unet, vae, text_encoder, tokenizer)  # freezes everything
    set_trainable(unet, ("lora", "conv_in"))  # conv_in: its base weight + bias and its LoRA (spec §2.2)
    set_trainable(vae, ("lora",))

    lora.add_unet_adapters(fake_unet, unet_targets, rank)
    active = list(lora.UNET_ADAPTERS) if fake_lora == "all" else ["default_others"]
    fake_unet.set_adapter(active)
    set_trainable(fake_unet, tuple(f"lora_{ab}.{a}." for a in active for ab in "AB"))
    fake_unet.eval()

    if gradient_checkpointing:
        for m in (unet, vae, fake_unet):
            m.enable_gradient_checkpointing()
    return Networks(Generator(model, autocast_moments=reference), ScoreUNet(real_unet, autocast=not reference),
                    ScoreUNet(fake_unet, autocast=False), unet_targets, vae_targets, rank)


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad, each once, in registration order."""
    return [p for p in module.parameters() if p.requires_grad]


def export_weights(generator: Generator, unet_targets: dict[str, list[str]], vae_targets: list[str], rank: int,
                   metadata: dict | None = None) -> OSEDiffWeights:
    """The generator's trained tensors in the authors' layout (spec §3.1), fp32 on the CPU."""
    m = generator.model
    unet_state = {k: v.float().cpu() for k, v in lora.lora_state(m.unet, ("lora", "conv_in")).items()}
    vae_state = {k: v.float().cpu() for k, v in lora.lora_state(m.vae, ("lora",)).items()}
    return OSEDiffWeights(unet_targets=unet_targets, vae_targets=vae_targets, rank_unet=rank, rank_vae=rank,
                          unet_state=unet_state, vae_state=vae_state, metadata=dict(metadata or {}))
