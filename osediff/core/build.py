"""Building SD 2.1-base's networks from weight files: the UNet, VAE and CLIP text encoder (+ tokenizer) from a
diffusers folder, a hub id or a single A1111/ComfyUI-style checkpoint, with OSEDiff's LoRA merged in (spec §3.3).

Where it can, each network is built empty and filled tensor by tensor in its final dtype (`load_base`), so the
fp32 model never exists; `apply_weights` installs the weights into modules already built (merged or as peft
adapters). `OSEDiffModel.from_pretrained` (`model.py`) runs the networks built here.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from osediff.core import lora
from osediff.core.checkpoint import OSEDiffWeights

log = logging.getLogger(__name__)


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
                trim_heap()

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
    trim_heap()
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
                trim_heap()  # the merge's freed fp32 temporaries, before the next module comes on top
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


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere). Freed tensors below
    glibc's mmap threshold (~32 MB) stay in the process otherwise, and only small allocations can reuse them, so
    the large activations of the first image would come on top (peak RSS) instead of in their place."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
