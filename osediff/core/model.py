"""The OSEDiff generator: SD 2.1-base VAE + UNet (+ LoRA) + CLIP text encoder, run for one step at t = 999.

`OSEDiffModel` owns the weights; the image-level recipe (resizing, prompts, colour fix, files) lives in
`pipeline.py`. Images here are in the VAE convention [-1, 1] — the only module that uses it.

    z   = E_lora(x) · 0.18215            (posterior mean by default; a sample with `sample=True`, spec §1.6)
    ε̂   = UNet_lora(z, t=999, c)         (latent-tiled for large images, spec §1.7)
    ẑ0  = (z − √(1−ᾱ)·ε̂)/√ᾱ              (spec §1.8)
    y   = clamp(D(ẑ0 / 0.18215), −1, 1)  (frozen decoder, spec §1.9)
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn

from osediff.core import lora, schedule
from osediff.core.checkpoint import OSEDiffWeights, load_weights
from osediff.tiling.latent import tiled_apply

log = logging.getLogger(__name__)

# Sizes up to which the VAE runs untiled: the reference's thresholds (tile + 2·pad, spec §1.6, §1.9).
_ENC_PAD, _DEC_PAD = 32, 11


def load_base(base: str, dtype: torch.dtype = torch.float32):
    """(unet, vae, text_encoder, tokenizer) of SD 2.1-base from a diffusers folder or hub id, on the CPU in
    `dtype` (fp32 by default, so LoRA merges in full precision); the caller moves them to their device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from osediff.weights.locate import MissingWeightsError, missing_message

    try:
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
        # eager attention: the reference's transformers 4.28 computed CLIP attention explicitly, and SDPA (the
        # default of transformers >= 4.36) rounds differently in fp16
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", torch_dtype=dtype,
                                                     attn_implementation="eager")
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=dtype)
    except OSError as e:
        raise MissingWeightsError(f"{missing_message('base', base)}\n  ({type(e).__name__}: {e})") from e
    if unet.config.sample_size == 96:  # 96 latent px = 768 image px: SD 2.1 (v-prediction), OSEDiff issue #65
        log.warning("%s looks like SD 2.1 (768, v-prediction); OSEDiff needs SD 2.1-base (512, epsilon)", base)
    return unet, vae, text_encoder, tokenizer


class OSEDiffModel(nn.Module):
    """Generator of OSEDiff (spec §0, §1.5–§1.9). Public call: `forward(x, prompt_embeds) -> y`."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer, cache_size: int = 256):
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer = tokenizer
        # a plain float, so `.to(fp16)` cannot round it: the reference keeps ᾱ in fp32 (spec §1.8, §1.11)
        self.alpha_bar = schedule.alphas_cumprod()[schedule.TIMESTEP].item()
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self.requires_grad_(False)
        self.eval()

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, base: str, weights: str | OSEDiffWeights | None, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, merge: bool = True) -> OSEDiffModel:
        """SD 2.1-base + OSEDiff weights. `merge=True` folds the LoRA into the weights (same function, faster,
        spec §3.3); `merge=False` keeps the reference's peft adapters. `weights=None` gives plain SD."""
        unet, vae, text_encoder, tokenizer = load_base(base)
        if weights is not None:
            w = weights if isinstance(weights, OSEDiffWeights) else load_weights(weights)
            apply_weights(unet, vae, w, merge=merge)
        return cls(unet, vae, text_encoder, tokenizer).to(device=device, dtype=dtype)

    def optimize(self, *, channels_last: bool = False, compile: bool = False) -> OSEDiffModel:
        """Speed options that keep the function: NHWC memory layout for the convolutions, and `torch.compile`
        of the UNet and the VAE (in place, so parameter names do not change). Returns self."""
        if channels_last:
            for m in (self.unet, self.vae):
                m.to(memory_format=torch.channels_last)
        if compile:
            for m in (self.unet, self.vae.encoder, self.vae.decoder):
                m.compile()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_out.weight.dtype if hasattr(self.unet.conv_out, "weight") else next(
            self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # --- steps --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """(B, 77, D) last hidden states of the CLIP text encoder (spec §1.5); identical prompts are encoded
        once and kept in a small LRU cache (the reference re-encodes on every call, spec §8.7)."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo:
            ids = self.tokenizer(todo, max_length=self.tokenizer.model_max_length, padding="max_length",
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            embeds = self.text_encoder(ids)[0].to(self.dtype)
            for p, e in zip(todo, embeds):
                self._cache[p] = e
        for p in prompts:
            self._cache.move_to_end(p)
        out = torch.stack([self._cache[p] for p in prompts])
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    def encode(self, x: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None,
               tile: int = 1024, tile_batch: int = 1, offload: str | None = None) -> torch.Tensor:
        """x (B,3,H,W) in [-1,1], H and W multiples of 8 -> scaled latent (B,4,H/8,W/8) in the VAE's dtype."""
        x = x.to(self.vae.dtype)
        if max(x.shape[-2:]) <= tile + 2 * _ENC_PAD:
            moments = self.vae.quant_conv(self.vae.encoder(x))
        else:
            from osediff.tiling.vae import encode_moments

            moments = encode_moments(self.vae, x, tile=tile, tile_batch=tile_batch, offload=offload)
        mean, logvar = moments.to(self.vae.dtype).chunk(2, dim=1)
        z = mean
        if sample:  # the reference's `latent_dist.sample()` (spec §1.6)
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return z * schedule.VAE_SCALING

    def denoise(self, z: torch.Tensor, prompt_embeds: torch.Tensor, *, tile: int = 96, overlap: int = 32,
                tile_batch: int = 1) -> torch.Tensor:
        """One UNet step at t=999 and the closed-form x0 (spec §1.7, §1.8): (B,4,h,w) -> float32 (B,4,h,w)."""
        b = z.shape[0]

        def eps_fn(tiles: torch.Tensor) -> torch.Tensor:
            reps = tiles.shape[0] // b  # tiles of the same images are stacked along the batch axis
            c = prompt_embeds.repeat(reps, 1, 1)
            t = torch.full((tiles.shape[0],), schedule.TIMESTEP, device=tiles.device, dtype=torch.long)
            return self.unet(tiles.to(self.dtype), t, encoder_hidden_states=c).sample

        eps = tiled_apply(eps_fn, z, tile, overlap, tile_batch)
        return schedule.x0_from_eps(z, eps, self.alpha_bar)

    def decode(self, z0: torch.Tensor, *, tile: int = 224, tile_batch: int = 1,
               offload: str | None = None) -> torch.Tensor:
        """Scaled clean latent (B,4,h,w) -> image (B,3,8h,8w) in [-1,1] (clamped), spec §1.9."""
        z = z0.to(self.vae.dtype) / schedule.VAE_SCALING
        if max(z.shape[-2:]) <= tile + 2 * _DEC_PAD:
            y = self.vae.decoder(self.vae.post_quant_conv(z))
        else:
            from osediff.tiling.vae import decode_latents

            y = decode_latents(self.vae, z, tile=tile, tile_batch=tile_batch, offload=offload)
        return y.clamp(-1, 1)

    def forward(self, x: torch.Tensor, prompt_embeds: torch.Tensor, *, sample: bool = False,
                generator: torch.Generator | None = None, tile: int = 96, tile_overlap: int = 32,
                tile_batch: int = 1, vae_encoder_tile: int = 1024, vae_decoder_tile: int = 224,
                vae_offload: str | None = None) -> torch.Tensor:
        """x (B,3,H,W) in [-1,1] (H, W multiples of 8), prompt_embeds (B,77,D) -> SR image (B,3,H,W) in [-1,1].

        `vae_offload="cpu"` parks the tiled VAE's per-tile state in host memory between layers (large images on
        small GPUs; slower)."""
        z = self.encode(x, sample=sample, generator=generator, tile=vae_encoder_tile, tile_batch=tile_batch,
                        offload=vae_offload)
        z0 = self.denoise(z, prompt_embeds.to(self.dtype), tile=tile, overlap=tile_overlap, tile_batch=tile_batch)
        return self.decode(z0, tile=vae_decoder_tile, tile_batch=tile_batch, offload=vae_offload)


def apply_weights(unet: nn.Module, vae: nn.Module, w: OSEDiffWeights, *, merge: bool = True) -> None:
    """Install OSEDiff's trained weights into SD 2.1-base modules (fp32 recommended).

    merge=True: spec §3.3 — conv_in := stored conv_in (+ its ΔW), every other target W := W + ΔW.
    merge=False: spec §3.2 — the reference's peft adapters with the stored tensors copied in.
    """
    if not merge:
        lora.add_unet_adapters(unet, w.unet_targets, w.rank_unet)
        lora.copy_lora_state(unet, w.unet_state, ("lora", "conv_in"))
        lora.add_vae_adapter(vae, w.vae_targets, w.rank_vae)
        lora.copy_lora_state(vae, w.vae_state, ("lora",))
        return
    with torch.no_grad():
        unet.conv_in.weight.copy_(w.unet_state["conv_in.base_layer.weight"])
        unet.conv_in.bias.copy_(w.unet_state["conv_in.base_layer.bias"])
    for adapter in lora.UNET_ADAPTERS:
        lora.merge_into(unet, w.unet_state, w.unet_targets[adapter], adapter, w.rank_unet)
    lora.merge_into(vae, w.vae_state, w.vae_targets, lora.VAE_ADAPTER, w.rank_vae)
