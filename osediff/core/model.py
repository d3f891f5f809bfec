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
from collections import Counter, OrderedDict
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from osediff.core import lora, schedule
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


def load_base(base: str, dtype: torch.dtype = torch.float32, weights: OSEDiffWeights | None = None):
    """(unet, vae, text_encoder, tokenizer) of SD 2.1-base from a diffusers folder, a hub id or a single-file
    checkpoint (A1111/ComfyUI `.safetensors`/`.ckpt`, `osediff.weights.ldm`), on the CPU in `dtype`, with
    `weights`' LoRA merged in (spec §3.3) when given; the caller moves them to their device.

    Low memory: from a single file, or a local folder with one .safetensors file per module, each module is
    built empty (meta parameters) and filled tensor by tensor (read, LoRA merged in fp32, cast to `dtype`), so
    the fp32 model never exists and a bf16 load peaks near the bf16 model's size. The values are those of
    merging an fp32 model and casting it afterwards. Anything else (hub ids, sharded or .bin files, legacy key
    names) takes the libraries' loaders in fp32, the same merge, then the cast.
    """
    from pathlib import Path

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from osediff.weights.locate import MissingWeightsError, missing_message

    unet_edits, vae_edits = merge_edits(weights) if weights is not None else ({}, {})
    if Path(base).is_file():
        return _load_single_file(base, dtype, unet_edits, vae_edits)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
        # eager attention: the reference's transformers 4.28 computed CLIP attention explicitly, and SDPA (the
        # default of transformers >= 4.36) rounds differently in fp16
        text_encoder = _load_module(
            base, "text_encoder", dtype, {},
            lambda d: CLIPTextModel(CLIPTextConfig.from_pretrained(d, attn_implementation="eager")),
            lambda v: CLIPTextModel.from_pretrained(base, subfolder="text_encoder", torch_dtype=torch.float32,
                                                    attn_implementation="eager", variant=v))
        unet = _load_module(base, "unet", dtype, unet_edits,
                            lambda d: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(d)),
                            lambda v: UNet2DConditionModel.from_pretrained(base, subfolder="unet", variant=v,
                                                                           torch_dtype=torch.float32))
        vae = _load_module(base, "vae", dtype, vae_edits,
                           lambda d: AutoencoderKL.from_config(AutoencoderKL.load_config(d)),
                           lambda v: AutoencoderKL.from_pretrained(base, subfolder="vae", variant=v,
                                                                   torch_dtype=torch.float32))
    except OSError as e:
        raise MissingWeightsError(f"{missing_message('base', base)}\n  ({type(e).__name__}: {e})") from e
    if unet.config.sample_size == 96:  # 96 latent px = 768 image px: SD 2.1 (v-prediction), OSEDiff issue #65
        log.warning("%s looks like SD 2.1 (768, v-prediction); OSEDiff needs SD 2.1-base (512, epsilon)", base)
    return unet, vae, text_encoder, tokenizer


def _load_single_file(path: str, dtype: torch.dtype, unet_edits: dict, vae_edits: dict):
    """`load_base` from one LDM-layout file: the three networks built empty from the carried SD 2.1-base configs
    (or `$OSEDIFF_BASE_CONFIG`'s) and filled from the file, each tensor renamed, cast and merged as it is read
    (`osediff.weights.ldm`); no config is ever looked up on the hub."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from osediff.weights import ldm, single_file

    configs = single_file.load_configs()
    tokenizer = single_file.load_tokenizer()  # first: its temporary vocabulary is freed before the big tensors
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (position ids) real
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"], attn_implementation="eager"))
    text_names = set(text_encoder.state_dict())
    if ldm.is_safetensors(path):
        from osediff.files.tensors import header, iter_tensors

        # plain reads (the file's pages never count in our memory) of the used tensors only (not the EMA
        # copies), one network after the other as from a folder (text tower, UNet, VAE), each pass with a
        # scratch buffer sized to its own largest tensor (the text tower's is the 0.2 GB token embedding) and
        # the heap trimmed in between: the order, and so the peak, of a folder's load
        # Within a network the tensors are read in the order of their diffusers names, as a folder's file has
        # them: the LoRA merge's fp32 temporaries then fall between the kept tensors as they do from a folder
        # (in the LDM order a bf16 build peaked 0.28 GiB higher).
        used = {k: got[0][1] for k in header(path)[0] if (got := ldm.targets(k, configs))}
        groups = [sorted((k for k in used if k.startswith(prefix)), key=used.get)
                  for prefix in (ldm.TEXT_PREFIX, ldm.UNET_PREFIX, ldm.VAE_PREFIX)]

        def passes():
            for group in groups:
                yield from iter_tensors(path, group, reuse=True, file_order=False)
                _trim_heap()

        tensors = passes()
    else:
        import zipfile

        state = ldm.ckpt_state(path)
        # a zip checkpoint is memory-mapped by torch.load: its pages can be given back as they are used (never
        # for a legacy pickle, whose tensors live in ordinary memory that madvise would wipe)
        tensors = _released(state.items()) if zipfile.is_zipfile(path) else iter(state.items())
    items = ((comp, ldm.text_name(name, text_names) if comp == "text_encoder" else name, t)
             for comp, name, t in ldm.convert(tensors, configs))
    _fill({"unet": (unet, unet_edits), "vae": (vae, vae_edits), "text_encoder": (text_encoder, {})}, items, dtype)
    _trim_heap()
    log.info("SD 2.1-base built from the single file %s", path)
    return unet.eval(), vae.eval(), text_encoder.eval(), tokenizer


def merge_edits(w: OSEDiffWeights) -> tuple[dict, dict]:
    """(UNet edits, VAE edits): parameter name -> function(fp32 base tensor) -> merged fp32 tensor (spec §3.3):
    conv_in := the stored conv_in (+ its ΔW), every other target W := W + ΔW."""
    def merger(state, name, adapter, rank):
        a, b = lora.lora_pair(state, name, adapter)
        return lambda t: lora.merged_weight(t, a, b, rank, name)

    unet = {f"{n}.weight": merger(w.unet_state, n, adapter, w.rank_unet)
            for adapter in lora.UNET_ADAPTERS for n in lora.unique(w.unet_targets[adapter])}
    conv_in = unet.get("conv_in.weight", lambda t: t)
    stored_w, stored_b = w.unet_state["conv_in.base_layer.weight"], w.unet_state["conv_in.base_layer.bias"]
    unet["conv_in.weight"] = lambda t: conv_in(stored_w.to(t.dtype))
    unet["conv_in.bias"] = lambda t: stored_b.to(t.dtype)
    vae = {f"{n}.weight": merger(w.vae_state, n, lora.VAE_ADAPTER, w.rank_vae) for n in lora.unique(w.vae_targets)}
    return unet, vae


def _released(items):
    """Yield (name, memory-mapped tensor) pairs and, once the consumer has copied one, give its file pages back
    (Linux `madvise(MADV_DONTNEED)`; they are clean file pages, re-read if touched again). Without it every
    page of a 5 GB .ckpt stays in the process's resident set until the whole file is unmapped."""
    import ctypes
    import mmap

    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        dontneed = mmap.MADV_DONTNEED
    except (OSError, AttributeError):  # not Linux: the pages are released when the file is closed
        yield from items
        return
    page = mmap.PAGESIZE
    for name, t in items:
        yield name, t
        storage = t.untyped_storage()
        begin, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        begin = -(-begin // page) * page  # whole pages inside the storage only: neighbours keep theirs
        end = end // page * page
        if end > begin:
            madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), dontneed)


def _load_module(base: str, sub: str, dtype: torch.dtype, edits: dict, build_empty, load_fp32) -> nn.Module:
    """One component (see `load_base`): streamed into an empty skeleton where possible, else the library path."""
    from pathlib import Path

    folder = Path(base) / sub
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    plain = [f for f in files if ".fp16." not in f.name]  # a folder may hold fp32 files and fp16 variants
    files = plain or files
    if len(files) == 1 and not list(folder.glob("*.index.json")):
        try:
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (position ids) real
                model = build_empty(str(folder))
            if _stream_into(model, files[0], dtype, edits):
                _trim_heap()  # the merge's freed fp32 temporaries, before the next module comes on top
                return model.eval()
        except (ImportError, ValueError) as e:  # no accelerate, an unusual file: the library path below
            log.debug("%s: streaming load not used (%s)", folder, e)
    # a folder with only `*.fp16.*` weight files (a cached fp16 variant) must be asked for by its variant name
    variant = "fp16" if files and not plain else None
    model = load_fp32(variant)
    _apply_edits(model, edits)
    return model.to(dtype).eval()


def _stream_into(model: nn.Module, path, dtype: torch.dtype, edits: dict) -> bool:
    """Fill an empty `model` from one .safetensors file (see `_fill`); False, touching nothing, when the file's
    names are not exactly the model's."""
    from osediff.files.tensors import header, iter_tensors
    from osediff.weights.ldm import text_name

    expected = set(model.state_dict())
    # transformers 5 dropped the text tower's `text_model.` prefix that files written by 4.x carry
    rename = {n: text_name(n.removeprefix("text_model."), expected) for n in header(path)[0]}
    if set(rename.values()) != expected or len(rename) != len(expected) or not set(edits) <= expected:
        return False
    _fill({"m": (model, edits)}, (("m", rename[n], t) for n, t in iter_tensors(path, reuse=True)), dtype)
    return True


def _fill(targets: dict[str, tuple[nn.Module, dict]], items, dtype: torch.dtype) -> None:
    """Fill empty (meta) modules tensor by tensor (peak: the modules + one tensor). `targets`: component ->
    (module, edits); `items` yields (component, parameter name, tensor), where a tensor may be a scratch view
    valid only until the next one (it is cast or copied at once). ValueError for a name or shape the module
    does not have, or a parameter left unfilled."""
    with torch.no_grad():
        for comp, name, t in items:
            model, edits = targets[comp]
            parent, _, leaf = name.rpartition(".")
            try:
                mod = model.get_submodule(parent)
            except AttributeError:
                raise ValueError(f"{comp}: no module for {name}") from None
            old = mod._parameters.get(leaf, mod._buffers.get(leaf))
            if old is None or tuple(old.shape) != tuple(t.shape):
                raise ValueError(f"{comp}: {name} has shape {tuple(t.shape)}, the module "
                                 f"{'has no such tensor' if old is None else tuple(old.shape)}")
            # the kept tensor is allocated before the merge's fp32 temporaries, so those are freed above it
            # instead of leaving holes between kept tensors (0.45 GB of a bf16 SD 2.1 build otherwise)
            out = torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype)
            t = out.copy_(edits[name](t.float()) if name in edits else t)
            if leaf in mod._parameters:
                mod._parameters[leaf] = nn.Parameter(t, requires_grad=mod._parameters[leaf].requires_grad)
            else:
                mod._buffers[leaf] = t
    for comp, (model, _) in targets.items():
        left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
        if left:
            raise ValueError(f"{comp}: not in the file: {left[:3]}")


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
        _trim_heap()

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
            _trim_heap()  # the UNet's freed activations, before the decoder's larger ones (CPU peak RSS −0.3 GB)
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


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere). Freed tensors below
    glibc's mmap threshold (~32 MB) stay in the process otherwise, and only small allocations can reuse them, so
    the large activations of the first image would come on top (peak RSS) instead of in their place."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
    for model, edits in zip((unet, vae), merge_edits(w)):
        _apply_edits(model, edits)


def _apply_edits(model: nn.Module, edits: dict) -> None:
    """`merge_edits` applied in place to a built model (each result cast to its parameter's dtype)."""
    with torch.no_grad():
        for name, fn in edits.items():
            p = model.get_parameter(name)
            p.copy_(fn(p.detach().float()))
