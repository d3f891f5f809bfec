"""The two nodes: `OSEDiffLoader` (weights -> OSEDIFF_MODEL) and `OSEDiffUpscale` (IMAGE -> ×s IMAGE + prompt).

Thin by design: the loader calls `OSEDiffPipeline.from_pretrained` (on ComfyUI's offload device, in ComfyUI's
precision, see memory.py), the upscaler has ComfyUI's memory manager load it and calls the pipeline on each
image of the batch as a (1,3,H,W) float tensor, exactly as the Python API's `pipe(tensor)` (the float path: no
8-bit quantisation, see the README "ComfyUI"). Written in ComfyUI's classic node API (INPUT_TYPES /
RETURN_TYPES / NODE_CLASS_MAPPINGS), which every ComfyUI release loads; ComfyUI's own modules are imported
inside the functions that use them, so the pack imports with only `folder_paths` stubbed.
"""

from __future__ import annotations

import logging
from dataclasses import fields

import torch

from . import memory, models

log = logging.getLogger(__name__)

MODEL_TYPE = "OSEDIFF_MODEL"
CATEGORY = "image/upscaling"
DTYPES = ("auto", "fp16", "bf16", "fp32")  # auto: ComfyUI's choice for its device (memory.auto_dtype)
COLOR_FIXES = ("adain", "wavelet", "none")
# OOM retry floors: latent tile (×8 px), VAE encoder / decoder tiles (px)
MIN_TILE, MIN_ENCODER_TILE, MIN_DECODER_TILE = 32, 128, 64
STEPS = 100  # progress-bar steps per image: the pipeline's stages and UNet tiles move it within each image


class OSEDiffLoader:
    """SD 2.1-base + OSEDiff LoRA (+ the RAM/DAPE tagger) as one pipeline on ComfyUI's device."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "base": (models.base_choices(), {"tooltip": "SD 2.1-base: a diffusers folder (models/diffusers/) or "
                                                        "one file (models/checkpoints/)"}),
            "weights": (models.file_choices("weights"), {"tooltip": "OSEDiff LoRA: osediff.pkl (models/osediff/ or "
                                                                   "models/loras/)"}),
            "ram": (models.file_choices("ram"), {"tooltip": "RAM Swin-L tagger, or none (no tags)"}),
            "dape": (models.file_choices("dape"), {"tooltip": "DAPE LoRA of the tagger, or none (no tags)"}),
            "dtype": (list(DTYPES), {"default": "auto",
                                     "tooltip": "auto: what ComfyUI picks for its device (fp16 on most GPUs, "
                                                "fp32 on the CPU and with --force-fp32)"}),
        }, "optional": {
            "max_memory": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 4096.0, "step": 0.5,
                                     "tooltip": "GiB a run may use (GPU memory, or RAM on the CPU); beyond it tile "
                                                "states spill to the temp folder, same output bit for bit. "
                                                "0: automatic from the free memory (osediff sr --max-memory)"}),
        }}

    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads OSEDiff (one-step diffusion super-resolution) once; reused across prompts."

    def load(self, base: str, weights: str, ram: str, dape: str, dtype: str = "auto", max_memory: float = 0.0):
        import comfy.model_management as mm

        if dtype == "auto":
            dtype = memory.auto_dtype(mm.get_torch_device())
        # built where ComfyUI keeps models it is not running (RAM, unless --highvram); the upscaler loads it
        pipe = models.load_pipeline(base, weights, ram, dape, dtype, str(mm.unet_offload_device()))
        memory.patchers(pipe)  # wrapped once; ComfyUI lists them from the first upscale on
        # a limit of 0 keeps the pipeline's automatic one (osediff sr --max-memory)
        return (pipe.with_options(max_memory=max_memory) if max_memory > 0 else pipe,)


class OSEDiffUpscale:
    """Each image of the batch ×scale through OSEDiff; returns the images and the prompts used."""

    @classmethod
    def INPUT_TYPES(cls):
        from osediff.core.options import SROptions

        d = SROptions()
        return {
            "required": {
                "model": (MODEL_TYPE,),
                "image": ("IMAGE",),
                "scale": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 16.0, "step": 0.5}),
                "color_fix": (list(COLOR_FIXES), {"default": "adain"}),
                "prompt": ("STRING", {"default": "", "multiline": False,
                                      "tooltip": "added after the tags, as `osediff sr --prompt`"}),
            },
            "optional": {
                "tags": ("STRING", {"default": "", "tooltip": "when given, used instead of DAPE's tags"}),
                "tile": ("INT", {"default": d.tile, "min": 8, "max": 512, "step": 8,
                                 "tooltip": "UNet latent tile (×8 pixels)"}),
                "tile_overlap": ("INT", {"default": d.tile_overlap, "min": 0, "max": 256, "step": 8}),
                "vae_encoder_tile": ("INT", {"default": d.vae_encoder_tile, "min": 64, "max": 8192, "step": 64}),
                "vae_decoder_tile": ("INT", {"default": d.vae_decoder_tile, "min": 32, "max": 4096, "step": 32}),
            },
        }

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "prompt")
    FUNCTION = "upscale"
    CATEGORY = CATEGORY
    DESCRIPTION = "OSEDiff ×scale super-resolution; the prompt output gives the text used (one line per image)."

    def upscale(self, model, image: torch.Tensor, scale: float = 4.0, color_fix: str = "adain", prompt: str = "",
                tags: str = "", tile: int | None = None, tile_overlap: int | None = None,
                vae_encoder_tile: int | None = None, vae_decoder_tile: int | None = None):
        import comfy.model_management as mm
        import comfy.utils

        from osediff.core.pipeline import OSEDiffPipeline
        from osediff.core.prompts import FixedTags, TagRecorder, format_prompt

        tiles = {k: v for k, v in (("tile", tile), ("tile_overlap", tile_overlap),
                                   ("vae_encoder_tile", vae_encoder_tile), ("vae_decoder_tile", vae_decoder_tile))
                 if v is not None}
        pipe = model.with_options(scale=scale_value(scale), color_fix=color_fix, **tiles)
        x = to_nchw(image)  # (B,3,H,W) float [0,1]
        memory.load(pipe, memory.memory_required(pipe, x))  # on ComfyUI's device, evicting others if needed
        # records the tags the pipeline got, image by image, on their way in
        recorder = TagRecorder(FixedTags(tags.strip()) if tags.strip() else pipe.extractor)
        pipe = OSEDiffPipeline(pipe.model, recorder, pipe.options)
        used: list[str] = []

        n = x.shape[0]
        bar = comfy.utils.ProgressBar(STEPS * n)
        outs = []
        for i in range(n):
            mm.throw_exception_if_processing_interrupted()
            report = _reporter(bar, i, n, mm.throw_exception_if_processing_interrupted)
            out, pipe = run_with_oom_retry(pipe, x[i:i + 1], prompt, mm.soft_empty_cache, report)
            outs.append(out)
            used.append(recorder.seen[-1])  # the tags of the attempt that fitted (a retry reads them again)
            bar.update_absolute(STEPS * (i + 1), STEPS * n)
        mm.throw_exception_if_processing_interrupted()
        text = "\n".join(format_prompt(t, prompt) for t in used)
        return (torch.cat(outs).movedim(1, -1).float(), text)


# --- helpers (pure, tested directly) ---------------------------------------------------------------------------
def to_nchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B,H,W,C) float [0,1] -> (B,3,H,W): grey repeated, an alpha channel dropped."""
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an IMAGE (B,H,W,C) with C in 1/3/4, got shape {tuple(image.shape)}")
    rgb = image[..., :3] if image.shape[-1] != 1 else image.expand(-1, -1, -1, 3)
    return rgb.movedim(-1, 1).contiguous().float()


def scale_value(scale: float) -> int | float:
    """The node's FLOAT scale as the pipeline option: whole numbers as int (so ×4 is exactly `scale=4`), other
    values only when this osediff's `SROptions.scale` accepts floats."""
    from osediff.core.options import SROptions

    if float(scale).is_integer():
        return int(scale)
    annotation = str(next(f.type for f in fields(SROptions) if f.name == "scale"))
    if "float" not in annotation:
        raise ValueError(f"scale {scale}: this osediff supports whole-number scales only (1, 2, 3, 4, ...); "
                         "choose one, or upgrade osediff for fractional scales")
    return float(scale)


def run_with_oom_retry(pipe, x: torch.Tensor, prompt: str, empty_cache, progress=None):
    """`pipe(x, prompt, progress=progress)`; on out-of-memory, empty the cache and retry with half the tile sizes until the floors
    (MIN_*). Returns (output, the pipeline whose tiles fitted, kept for the next images of the batch)."""
    while True:
        try:
            return pipe(x, prompt=prompt, progress=progress), pipe
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e):
                raise
            o = pipe.options
            smaller = dict(tile=max(MIN_TILE, o.tile // 2), vae_encoder_tile=max(MIN_ENCODER_TILE,
                           o.vae_encoder_tile // 2), vae_decoder_tile=max(MIN_DECODER_TILE, o.vae_decoder_tile // 2))
            if all(smaller[k] == getattr(o, k) for k in smaller):
                raise
            smaller["tile_overlap"] = min(o.tile_overlap, smaller["tile"] // 2)
            log.warning("OSEDiff ran out of memory; retrying with smaller tiles %s", smaller)
            empty_cache()
            pipe = pipe.with_options(**smaller)


def _reporter(bar, i: int, n: int, check_interrupted):
    """The pipeline's stage reports for image i of n -> ComfyUI's progress bar, checking for Cancel at every
    stage and UNet tile (so an interruption stops within a tile, not only between images)."""
    from osediff.core.model import progress_fraction

    def report(stage: str, done: int, total: int) -> None:
        check_interrupted()
        bar.update_absolute(int(STEPS * (i + progress_fraction(stage, done, total))), STEPS * n)
    return report


def _is_oom(e: BaseException) -> bool:
    # CUDA raises torch.OutOfMemoryError; MPS and some allocators a RuntimeError naming it
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


NODE_CLASS_MAPPINGS = {"OSEDiffLoader": OSEDiffLoader, "OSEDiffUpscale": OSEDiffUpscale}
NODE_DISPLAY_NAME_MAPPINGS = {"OSEDiffLoader": "Load OSEDiff", "OSEDiffUpscale": "Upscale Image (OSEDiff)"}
