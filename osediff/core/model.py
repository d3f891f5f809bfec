"""The OSEDiff generator: SD 2.1-base VAE + UNet (+ LoRA) + CLIP text encoder, run for one step at t = 999.

`OSEDiffModel` owns the weights (built from the weight files by `build.py`); the image-level recipe (resizing,
prompts, colour fix, files) lives in `pipeline.py`. Images here are in the VAE convention [-1, 1] — the only
module that uses it.

    z   = E_lora(x) · 0.18215            (posterior mean by default; a sample with `sample=True`, spec §1.6)
    ε̂   = UNet_lora(z, t=999, c)         (latent-tiled for large images, spec §1.7)
    ẑ0  = (z − √(1−ᾱ)·ε̂)/√ᾱ              (spec §1.8)
    y   = clamp(D(ẑ0 / 0.18215), −1, 1)  (frozen decoder, spec §1.9)
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from osediff.core import schedule
from osediff.core.build import apply_weights, load_base, trim_heap
from osediff.core.checkpoint import OSEDiffWeights, load_weights
from osediff.core.memory import MemorySession
from osediff.tiling.latent import tiled_apply

log = logging.getLogger(__name__)

# `progress(stage, done, total)`: called as each stage starts (done = 0: "tags", "encode", "unet", "decode",
# "color_fix") and as it goes: "unet" before each tile batch (done = tiles done), the tiled VAE stages after each
# tile batch step between sync points (done = steps done of `total`, all passes × all tile batches). Front-ends
# use it for progress bars, stage timings and cancellation (an exception raised in it aborts the run).
Progress = Callable[[str, int, int], None]

# where a progress bar stands when each stage of one image starts, by the stages' share of the FLOPs of a large
# image (2048²: encode 32, UNet 34, decode 54 TFLOP, benchmarks/RESULTS.md); a stage's steps fill its span
STAGE_START = {"tags": 0.0, "encode": 0.02, "unet": 0.28, "decode": 0.55, "color_fix": 0.99}
_NEXT = {"tags": "encode", "encode": "unet", "unet": "decode", "decode": "color_fix"}


def progress_fraction(stage: str, done: int, total: int) -> float:
    """A `Progress` report as the fraction [0, 1) of one image's work done (for front-ends' progress bars)."""
    start = STAGE_START[stage]
    end = STAGE_START[_NEXT[stage]] if stage in _NEXT else start
    return start + (end - start) * min(done, total) / max(total, 1)

# Sizes up to which the VAE runs untiled: the reference's thresholds (tile + 2·pad, spec §1.6, §1.9).
_ENC_PAD, _DEC_PAD = 32, 11


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
        # fp16/bf16 safety (see `_rerun_nonfinite`): on by default, counts what was rerun in fp32
        self.check_finite = True
        self.reruns: Counter[str] = Counter()
        self._warned_nonfinite = False
        self.requires_grad_(False)
        self.eval()

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, base: str, weights: str | OSEDiffWeights | None, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, merge: bool = True) -> OSEDiffModel:
        """SD 2.1-base + OSEDiff weights. `merge=True` folds the LoRA into the weights (same function, faster,
        spec §3.3); `merge=False` keeps the reference's peft adapters. `weights=None` gives plain SD."""
        w = weights if weights is None or isinstance(weights, OSEDiffWeights) else load_weights(weights)
        # merged: built in `dtype` directly, layer by layer (see load_base); unmerged: adapters added afterwards
        unet, vae, text_encoder, tokenizer = load_base(base, dtype, w if merge else None)
        if w is not None and not merge:
            apply_weights(unet, vae, w, merge=False)
        return cls(unet, vae, text_encoder, tokenizer).to(device=device, dtype=dtype)

    def optimize(self, *, channels_last: bool = False, compile: bool = False,
                 compile_mode: str | None = None) -> OSEDiffModel:
        """Speed options that keep the function: NHWC memory layout for the convolutions, and `torch.compile`
        of the UNet and the VAE (in place, so parameter names do not change; `compile_mode` is torch.compile's
        `mode`, e.g. "max-autotune" or "reduce-overhead"). Returns self."""
        if channels_last:
            for m in (self.unet, self.vae):
                m.to(memory_format=torch.channels_last)
        if compile:
            for m in (self.unet, self.vae.encoder, self.vae.decoder):
                m.compile(mode=compile_mode)
        return self

    def _apply(self, fn, *args, **kwargs):
        # `.to()` / `.cuda()` / `.half()` move the cached prompt embeddings with the weights, so a model moved
        # off a GPU (ComfyUI evicting it) holds no memory there
        super()._apply(fn, *args, **kwargs)
        for p, e in self._cache.items():
            self._cache[p] = fn(e)
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
    def encode_text(self, prompts: list[str], *, cache: bool = True) -> torch.Tensor:
        """(B, 77, D) last hidden states of the CLIP text encoder (spec §1.5); identical prompts are encoded
        once and kept in a small LRU cache (the reference re-encodes on every call, spec §8.7). `cache=False`
        neither reads nor fills the cache (training, where the embedding depends on the autocast state)."""
        store = self._cache if cache else {}
        todo = [p for p in dict.fromkeys(prompts) if p not in store]
        if todo and self.text_encoder is None:
            raise RuntimeError(f"the text encoder was released (release_text_encoder); cannot encode {todo[0]!r}")
        if todo:
            ids = self.tokenizer(todo, max_length=self.tokenizer.model_max_length, padding="max_length",
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            embeds = self.text_encoder(ids)[0].to(self.dtype)
            for p, e in zip(todo, embeds):
                store[p] = e
        out = torch.stack([store[p] for p in prompts])
        if cache:
            for p in prompts:
                self._cache.move_to_end(p)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return out

    def release_text_encoder(self, keep: list[str]) -> None:
        """Encode the prompts in `keep` and free the CLIP text encoder (0.6 GB in bf16, 1.3 GB in fp32): for runs
        whose prompts are known in advance, such as `osediff sr` without DAPE (one prompt for every image).
        Those prompts stay cached for good; encoding any other raises."""
        self.encode_text(keep)
        self._cache_size = max(self._cache_size, len(self._cache))
        self.text_encoder = None
        trim_heap()

    def encode(self, x: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None,
               tile: int = 1024, tile_batch: int = 1, offload=None, cast_moments: bool = True,
               on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """x (B,3,H,W) in [-1,1], H and W multiples of 8 -> scaled latent (B,4,H/8,W/8) in the VAE's dtype.

        `cast_moments=False` keeps the posterior moments (and so the noise of a sample) in the dtype the encoder
        returned, as diffusers' `latent_dist` does: under autocast that is the autocast dtype, which is how the
        reference's fp16 training samples (spec §4.5); the latent then comes out in that dtype or float32.
        `offload`: a device or a `TileStore` for the tiled encoder's states (`osediff.tiling.vae`)."""
        x = x.to(self.vae.dtype)
        if max(x.shape[-2:]) <= tile + 2 * _ENC_PAD:
            moments = self.vae.quant_conv(self.vae.encoder(x))
        else:
            from osediff.tiling.vae import encode_moments

            moments = encode_moments(self.vae, x, tile=tile, tile_batch=tile_batch, offload=offload,
                                     on_step=on_step)
        mean, logvar = (moments.to(self.vae.dtype) if cast_moments else moments).chunk(2, dim=1)
        z = mean
        if sample:  # the reference's `latent_dist.sample()` (spec §1.6)
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return z * schedule.VAE_SCALING

    def denoise(self, z: torch.Tensor, prompt_embeds: torch.Tensor, *, tile: int = 96, overlap: int = 32,
                tile_batch: int = 1, fp32_fallback: bool = False,
                on_tile: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """One UNet step at t=999 and the closed-form x0 (spec §1.7, §1.8): (B,4,h,w) -> float32 (B,4,h,w).

        `fp32_fallback`: check every tile's ε̂ and rerun a non-finite one with the UNet in fp32 (one host
        sync per tile, so only on the rerun path of `forward`). `on_tile(done, total)`: progress per tile batch."""
        b = z.shape[0]

        def eps_fn(tiles: torch.Tensor) -> torch.Tensor:
            reps = tiles.shape[0] // b  # tiles of the same images are stacked along the batch axis
            c = prompt_embeds.repeat(reps, 1, 1).to(self.dtype)
            t = torch.full((tiles.shape[0],), schedule.TIMESTEP, device=tiles.device, dtype=torch.long)
            return self.unet(tiles.to(self.dtype), t, encoder_hidden_states=c).sample

        def checked_eps_fn(tiles: torch.Tensor) -> torch.Tensor:
            eps = eps_fn(tiles)
            if self.dtype == torch.float32 or bool(_finite_per_image(eps).all()):
                return eps
            self.reruns["unet_tiles"] += 1
            with _in_fp32(self.unet):
                return eps_fn(tiles)

        eps = tiled_apply(checked_eps_fn if fp32_fallback else eps_fn, z, tile, overlap, tile_batch, on_tile)
        return schedule.x0_from_eps(z, eps, self.alpha_bar)

    def decode(self, z0: torch.Tensor, *, tile: int = 224, tile_batch: int = 1, offload=None) -> torch.Tensor:
        """Scaled clean latent (B,4,h,w) -> image (B,3,8h,8w) in [-1,1] (clamped), spec §1.9."""
        return self._decode(z0, tile=tile, tile_batch=tile_batch, offload=offload).clamp(-1, 1)

    def _decode(self, z0: torch.Tensor, *, tile: int, tile_batch: int, offload=None,
                on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """`decode` before the clamp (where a NaN would still be visible), in the decoder's dtype."""
        z = z0.to(self._decoder_dtype) / schedule.VAE_SCALING
        if max(z.shape[-2:]) <= tile + 2 * _DEC_PAD:
            return self.vae.decoder(self.vae.post_quant_conv(z))
        from osediff.tiling.vae import decode_latents

        return decode_latents(self.vae, z, tile=tile, tile_batch=tile_batch, offload=offload, on_step=on_step)

    @property
    def _decoder_dtype(self) -> torch.dtype:
        return self.vae.post_quant_conv.weight.dtype

    def forward(self, x: torch.Tensor, prompt_embeds: torch.Tensor, *, sample: bool = False,
                generator: torch.Generator | None = None, tile: int = 96, tile_overlap: int = 32,
                tile_batch: int = 1, vae_encoder_tile: int = 1024, vae_decoder_tile: int = 224,
                vae_offload: str | None = None, progress: Progress | None = None,
                memory: MemorySession | None = None) -> torch.Tensor:
        """x (B,3,H,W) in [-1,1] (H, W multiples of 8), prompt_embeds (B,77,D) -> SR image (B,3,H,W) in [-1,1].

        `vae_offload="cpu"` parks the tiled VAE's per-tile state in host memory between layers (large images on
        small GPUs; slower). `memory` keeps the run within a memory limit (`osediff.core.memory`; same result
        bit for bit). `progress` is told when each stage starts and as it goes (see `Progress`)."""
        from osediff.tiling.vae import decode_cost, encode_cost

        report = progress or (lambda stage, done, total: None)
        c = prompt_embeds.to(self.dtype)
        idle = [self.unet, self.text_encoder]  # weights the VAE stages do not need
        enc = encode_cost(self.vae, tuple(x.shape), tile=vae_encoder_tile, tile_batch=tile_batch,
                          element_size=self.vae.dtype.itemsize)
        report("encode", 0, enc.steps)
        store = memory.vae_store("encoder", enc, idle, lambda t: encode_cost(
            self.vae, tuple(x.shape), tile=t, tile_batch=tile_batch, element_size=self.vae.dtype.itemsize),
            vae_offload) if memory is not None else None
        z = self.encode(x, sample=sample, generator=generator, tile=vae_encoder_tile, tile_batch=tile_batch,
                        offload=store or vae_offload, on_step=lambda done: report("encode", done, enc.steps))
        if memory is not None:
            memory.restore()  # the UNet, bit for bit
        z0 = self.denoise(z, c, tile=tile, overlap=tile_overlap, tile_batch=tile_batch,
                          on_tile=lambda done, total: report("unet", done, total))
        if z0.device.type == "cpu":
            trim_heap()  # the UNet's freed activations, before the decoder's larger ones (CPU peak RSS −0.3 GB)
        dec_cost = decode_cost(self.vae, tuple(z0.shape), tile=vae_decoder_tile, tile_batch=tile_batch,
                               element_size=self._decoder_dtype.itemsize)
        report("decode", 0, dec_cost.steps)
        store = memory.vae_store("decoder", dec_cost, idle, lambda t: decode_cost(
            self.vae, tuple(z0.shape), tile=t, tile_batch=tile_batch, element_size=self._decoder_dtype.itemsize),
            vae_offload) if memory is not None else None
        dec = dict(tile=vae_decoder_tile, tile_batch=tile_batch, offload=store or vae_offload)
        y = self._decode(z0, **dec, on_step=lambda done: report("decode", done, dec_cost.steps))
        if self.check_finite and (self.dtype, self._decoder_dtype) != (torch.float32, torch.float32):
            y = self._rerun_nonfinite(z, c, z0, y, dict(tile=tile, overlap=tile_overlap, tile_batch=tile_batch), dec,
                                      before_unet=memory.restore if memory is not None else None)
        return y.clamp(-1, 1)

    def _rerun_nonfinite(self, z, c, z0, y, unet_kw: dict, dec_kw: dict, before_unet=None) -> torch.Tensor:
        """fp16/bf16 safety: an image whose x̂0 (after the UNet) or decoded pixels (before the clamp) hold an inf
        or NaN is rerun with that stage in fp32 — the UNet tile by tile, so only the tiles that overflowed
        pay; the decoder for the whole image, since the exact tiled decoder shares GroupNorm statistics across
        tiles. Costs one fp32 sum over x̂0 and y and one host sync per call when nothing overflows."""
        ok_unet, ok_dec = torch.stack([_finite_per_image(z0), _finite_per_image(y).to(z0.device)]).tolist()
        if all(ok_unet) and all(ok_dec):
            return y
        y = y.clone()
        for i, (u_ok, d_ok) in enumerate(zip(ok_unet, ok_dec)):
            if u_ok and d_ok:
                continue
            self.reruns["images"] += 1
            stage = "UNet" if not u_ok else "VAE decoder"
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                log.warning("non-finite values after the %s in %s: rerunning that image in fp32 (counted in the "
                            "run summary; further cases are logged at debug level)", stage, self.dtype)
            else:
                log.debug("non-finite values after the %s: rerunning image %d of the batch in fp32", stage, i)
            zi0 = z0[i:i + 1]
            if not u_ok:
                if before_unet is not None:
                    before_unet()  # weights parked for the decoder come back first
                zi0 = self.denoise(z[i:i + 1], c[i:i + 1], fp32_fallback=True, **unet_kw)
            yi = self._decode(zi0, **dec_kw) if not u_ok else y[i:i + 1]
            if not bool(_finite_per_image(yi).all()) and self._decoder_dtype != torch.float32:
                self.reruns["decoder"] += 1
                with _in_fp32(self.vae.post_quant_conv, self.vae.decoder):
                    yi = self._decode(zi0, **dec_kw)
            if not bool(_finite_per_image(yi).all()):
                log.error("non-finite values remain after the fp32 rerun (non-finite input or latent?)")
            y[i:i + 1] = yi.to(y.dtype)
        return y


def _finite_per_image(t: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) bool on t's device: no inf or NaN in that image (no host sync).

    Through an fp32 sum, where any inf or NaN survives: one read of t without a byte-per-element mask (on a
    CPU 8× cheaper than `isfinite(t).all()` for bf16, ~5 ms for a 512² image on one thread). A finite sum can
    only overflow fp32 if values near bf16's maximum occur, which is an overflow worth a rerun anyway."""
    return torch.isfinite(t.flatten(1).sum(1, dtype=torch.float32))


@contextmanager
def _in_fp32(*modules: nn.Module):
    """Run `modules` in fp32 for the duration, then cast them back: fp16/bf16 -> fp32 -> fp16/bf16 is exact, so
    the weights afterwards are bit for bit what they were (in place: no second copy of the weights)."""
    dtypes = [next(m.parameters()).dtype for m in modules]
    for m in modules:
        m.float()
    try:
        yield
    finally:
        for m, dt in zip(modules, dtypes):
            m.to(dt)
