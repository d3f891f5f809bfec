"""The pack under ComfyUI's memory manager: OSEDiff's modules as `ModelPatcher`s, loaded through
`comfy.model_management.load_models_gpu`, precision chosen as ComfyUI chooses it.

How ComfyUI (0.3.64) manages a model, and what the pack does with each part:
- A `ModelPatcher(module, load_device, offload_device)` is what ComfyUI counts: `load_models_gpu([patcher],
  memory_required=...)` frees room on the device (evicting other models, least used first), moves the module
  there and lists it in `current_loaded_models`; evicting it (another model's load, `POST /free`,
  ComfyUI's "Unload models") moves the module back to the offload device and drops it from that list.
- The patcher writes its bookkeeping (`device`, `model_loaded_weight_memory`, ...) onto the module it holds;
  `OSEDiffModel.device` and `RAMTagger.device` are read-only properties, so each is wrapped in a `Held`
  module first.
- ComfyUI's loader moves weight by weight only for its own `comfy.ops` layers; other modules it may load only
  in part when VRAM is short ("lowvram"), leaving plain `nn.Linear`/`nn.Conv2d` weights on the CPU. OSEDiff's
  diffusers modules cannot run that way, so the pack asks for a full load and then moves any weight still
  elsewhere itself (`load`).
- The pipeline is built on the offload device, so the TF32 matmuls the CLI switches on for fp32 on CUDA (as the
  reference runs) are switched on in `load`, once the device is known.
- The evicted module stays in RAM on the offload device, held by the pack's pipeline cache (models.py): the
  next prompt moves it back without reading any file.

The one ComfyUI function the pack never calls is `unload_all_models()`: what else is loaded is ComfyUI's call.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# SD 2.1-base's parameter count (UNet 866 M + VAE 84 M + CLIP text 340 M), what ComfyUI's precision checks
# weigh against free VRAM; the choice has to be made before the model is built
SD21_PARAMS = 1_290_000_000
_PATCHER = "_comfy_patcher"  # the attribute under which a module keeps its one patcher


class Held(nn.Module):
    """One OSEDiff module as ComfyUI's `ModelPatcher` needs it: writable attributes for its bookkeeping."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net


# ComfyUI's log names a model by its class ("Requested to load OSEDiff")
class OSEDiff(Held):
    """The OSEDiff generator (SD 2.1's UNet, VAE and text encoder with the LoRA)."""


class OSEDiffTagger(Held):
    """The RAM/DAPE tagger."""


# --- modules <-> patchers -------------------------------------------------------------------------------------
def modules(pipe) -> list[nn.Module]:
    """The modules of an `OSEDiffPipeline` that hold weights: the OSEDiff model and the tagger if it is one."""
    found = [pipe.model]
    if isinstance(pipe.extractor, nn.Module):
        found.append(pipe.extractor)
    return found


def patcher(module: nn.Module, kind: type[Held] = Held):
    """The one `ModelPatcher` of `module` (made on first use, kept on the module so every prompt hands ComfyUI
    the same object, which is how `load_models_gpu` recognises a model it already holds)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    p = module.__dict__.get(_PATCHER)
    if p is None:
        p = comfy.model_patcher.ModelPatcher(kind(module), load_device=mm.get_torch_device(),
                                             offload_device=mm.unet_offload_device())
        module.__dict__[_PATCHER] = p  # not a submodule: state_dict and .to() never see it
    return p


def patchers(pipe) -> list:
    return [patcher(m, OSEDiff if m is pipe.model else OSEDiffTagger) for m in modules(pipe)]


def load(pipe, memory_required: int) -> torch.device:
    """Put the pipeline's modules on ComfyUI's device through its memory manager, with `memory_required` bytes
    of working memory kept free beside them; returns the device."""
    import comfy.model_management as mm

    ps = patchers(pipe)
    mm.load_models_gpu(ps, memory_required=memory_required, force_full_load=True)
    for p in ps:
        if _stray(p.model, p.load_device):
            log.info("moving the rest of %s to %s (ComfyUI loaded it in part)", type(p.model.net).__name__,
                     p.load_device)
            p.model.to(p.load_device)
    # the pipeline was built on the offload device (the CPU), where from_pretrained leaves TF32 alone: an fp32
    # run on CUDA gets the reference's TF32 matmuls here, as the CLI's does
    from osediff.core.pipeline import match_reference_matmuls

    device = ps[0].load_device
    if torch.device(device).type == "cuda" and match_reference_matmuls(device, pipe.model.dtype):
        log.info("fp32 on %s: TF32 matmuls on, as the reference runs", device)
    return device


def _stray(module: nn.Module, device: torch.device) -> bool:
    want = torch.device(device)
    return any(not _same(t.device, want) for t in [*module.parameters(), *module.buffers()])


def _same(a: torch.device, b: torch.device) -> bool:
    # "cuda" and "cuda:0" are the same place when the index is left out
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


# --- precision ------------------------------------------------------------------------------------------------
def auto_dtype(device: torch.device) -> str:
    """`dtype=auto` the ComfyUI way: fp16 where ComfyUI would run SD 2.1's UNet in fp16 on `device`, else bf16
    where it would use that, else fp32 (the CPU, `--force-fp32`, old cards). Under `--lowvram`/`--novram`
    the half types are also taken where ComfyUI would only cast to them, since halving the weights is the
    point there."""
    import comfy.model_management as mm

    if mm.should_use_fp16(device, model_params=SD21_PARAMS):
        return "fp16"
    if mm.should_use_bf16(device, model_params=SD21_PARAMS):
        return "bf16"
    low = getattr(mm, "VRAMState", None)
    if low is not None and getattr(mm, "vram_state", None) in (low.LOW_VRAM, low.NO_VRAM):
        if mm.should_use_fp16(device, model_params=SD21_PARAMS, prioritize_performance=False, manual_cast=True):
            return "fp16"
        if mm.should_use_bf16(device, model_params=SD21_PARAMS, prioritize_performance=False, manual_cast=True):
            return "bf16"
    return "fp32"


# --- how much room a run needs --------------------------------------------------------------------------------
# bytes per processed pixel and per byte of the model's dtype, fitted to the peaks of benchmarks/RESULTS.md
# (H200, bf16, weights subtracted): 512² 0.65 GiB and 1024² 2.45 GiB untiled, 2048² 4.3 GiB and 4096² 16 GiB
# with the exact tiled VAE, which keeps ~1.1× the untiled states of the whole map but not the per-layer work
UNTILED_VAE, TILED_VAE = 1215, 450
UNET = 1200  # per pixel of a UNet tile (8× its latent side), same fit
IMAGES = 96  # fp32 RGB planes of the whole image alive at once (input, upscaled, output, colour fix): 8 × 12 B
TAGGER = 256 * 2**20  # RAM Swin-L at 384²


def working_memory(w: int, h: int, dtype_bytes: int, *, tile: int, tile_batch: int = 1, encoder_tile: int,
                   decoder_tile: int, vae_offload: bool = False, tagger: bool = False) -> int:
    """Bytes a `w`×`h` processed image (the size the networks see) needs beyond the weights: the whole-image
    buffers plus the largest stage (VAE encode, UNet tiles, VAE decode run one after another). The VAE tiles
    where a side exceeds its tile (`encoder_tile` px, `decoder_tile` latent px); with `vae_offload` its
    states wait in RAM and the device holds about one tile."""
    px = w * h
    vae = []
    for side_px in (encoder_tile, decoder_tile * 8):
        if max(w, h) <= side_px:
            vae.append(UNTILED_VAE * dtype_bytes * px)
        elif vae_offload:  # one tile's states (3.25 GiB measured for a 4096² fp16 decode in 1792² tiles)
            vae.append(TILED_VAE * dtype_bytes * side_px * side_px)
        else:
            vae.append(TILED_VAE * dtype_bytes * px)
    unet_px = min(8 * tile, w) * min(8 * tile, h) * tile_batch
    stages = [*vae, UNET * dtype_bytes * unet_px, TAGGER if tagger else 0]
    return int(IMAGES * px + max(stages))


def memory_required(pipe, x: torch.Tensor) -> int:
    """`working_memory` for the largest image of the (B,3,H,W) batch `x` under the pipeline's options."""
    o = pipe.options
    w, h = pipe.plan(int(x.shape[-1]), int(x.shape[-2])).up
    dtype_bytes = torch.finfo(pipe.model.dtype).bits // 8
    return working_memory(w, h, dtype_bytes, tile=o.tile, tile_batch=o.tile_batch, encoder_tile=o.vae_encoder_tile,
                          decoder_tile=o.vae_decoder_tile, vae_offload=o.vae_offload,
                          tagger=isinstance(pipe.extractor, nn.Module))
