"""`OSEDiffPipeline`: an image in, its super-resolution out (spec §1.3–§1.10), on CUDA, MPS or CPU.

The recipe, for one image (`run_pictures` and `_restore` read as these steps):
 1. sizes: the output size (×scale, --long-side or --size) and the small-input guard: sides below
    process_size/s are first enlarged (PIL bicubic), within the --max-guard-megapixels cap  spec §1.3.2
 2. bicubic upscale to the processed size (PIL's kernel, bit-exact for 8-bit images)       spec §1.3.3
 3. reflect-pad to a multiple of 8 (the reference squashes with LANCZOS instead, §8.2)
 4. tags from the prompt extractor (DAPE) + user prompt -> CLIP embeddings (cached)       spec §1.4–1.5
 5. VAE encode -> one UNet step at t=999 -> x0 -> VAE decode -> clamp                     spec §1.6–1.9
 6. crop the padding; 8-bit floor quantisation; colour fix against the upscaled input; 8-bit floor again
                                                                                           spec §1.10
 7. guard undone: back to exactly the output size (the reference forgets to, §8.1); alpha re-attached.
For an integer scale s the sizes are the reference's (s·W × s·H). Deliberate differences from the reference
(README "Fidelity"): posterior mean instead of a sample (use `sample_latent=True, seed=N` for the reference's
behaviour), LoRA merged (`merge=False` keeps peft adapters), padding instead of squashing, guard fixed.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from osediff.core import precision
from osediff.core.colorfix import color_fix
from osediff.core.memory import MemorySession, choose_budget
from osediff.core.model import OSEDiffModel, Progress
from osediff.core.options import SROptions
from osediff.core.prompts import PromptExtractor, build_prompts
from osediff.core.resample import SizePlan, output_size, pad_to_multiple, plan_sizes, resize_bicubic
from osediff.files.images import Picture

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_warned_emulated_bf16 = False


def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags: /proc/cpuinfo where it exists, else what torch's own CPU probe reports."""
    flags = precision.read_cpu_flags()
    if flags is not None:
        return flags
    probe = getattr(torch, "cpu", None)  # private probes (torch >= 2.3); None = unknown -> auto picks fp32
    try:
        found = {"avx512_bf16": probe._is_avx512_bf16_supported(), "amx_bf16": probe._is_amx_tile_supported()}
    except AttributeError:
        return None
    return frozenset(k for k, v in found.items() if v)


def choose_dtype(name: str | None, device: torch.device) -> precision.DtypeChoice:
    """`precision.choose_dtype` for this machine; warns once per process when bf16 is forced on a CPU that
    emulates it."""
    global _warned_emulated_bf16
    choice = precision.choose_dtype(name, device.type, cpu_flags() if device.type == "cpu" else None)
    if choice.warning and not _warned_emulated_bf16:
        _warned_emulated_bf16 = True
        log.warning("%s", choice.warning)
    return choice


def resolve_dtypes(name: str | torch.dtype | None, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the UNet, text encoder and tagger, dtype of the VAE) for a `--dtype` value (`DTYPE_CHOICES`;
    None = "auto", see `osediff.core.precision`).

    "vae-bf16": the VAE (~85 % of the FLOPs at 512²) in bf16, the rest fp32. On CPUs with AVX512-BF16 this keeps
    most of bf16's speed while the UNet, whose ε error the x0 formula amplifies 14.6×, stays fp32.
    """
    if isinstance(name, torch.dtype):
        return name, name
    picked = choose_dtype(name, device).name
    if picked == "vae-bf16":
        return torch.float32, torch.bfloat16
    return DTYPES[picked], DTYPES[picked]


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def match_reference_matmuls(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Switch TF32 matmuls and cuDNN convolutions on for an fp32 run on CUDA, as the reference runs (a side
    effect of its imports, spec §1.11); process-wide, as there. Returns whether it did (False elsewhere: the CPU,
    MPS, half precision). Called where the model is built, and by front-ends that move it to CUDA later."""
    if torch.device(device).type != "cuda" or dtype != torch.float32:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def default_dtype(device: torch.device) -> torch.dtype:
    """The UNet dtype of `--dtype auto` on `device`: fp16 on CUDA/MPS (the reference's default); on the CPU bf16
    where it is native (AVX512-BF16 / AMX-BF16), else fp32."""
    return resolve_dtypes(None, device)[0]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """floor(255·x) as uint8: torchvision's ToPILImage truncation that the reference applies (spec §1.10).
    Computed in x's dtype for fp16/fp32 (so fp16 rounding is reproduced) and in fp32 for bf16, whose 8-bit
    mantissa cannot hold 255·x."""
    if x.dtype == torch.bfloat16:
        x = x.float()
    return (x * 255).to(torch.uint8)


def _warn_if_huge(up: tuple[int, int], limit_mp: float = 256.0) -> None:
    mp = up[0] * up[1] / 1e6
    if mp > limit_mp:
        log.warning("processing at %dx%d (%.0f megapixels): this will be slow and memory-hungry", *up, mp)


class OSEDiffPipeline:
    """OSEDiff ×s super-resolution. Public call: `pipe(image, prompt=None)`.

    `image` is a PIL image, a numpy array (H,W[,C]) uint8/uint16/float in [0,1], or a tensor (B,3,H,W) float in
    [0,1]; the result is the same kind at the output size (`SROptions`: ×scale, long_side or size; tensors:
    float in [0,1], not quantised). A grayscale PIL image (L, LA, I;16) comes back grayscale (BT.601 luma of
    the result; pass `image.convert("RGB")` for colour), with its ICC profile, EXIF and DPI in `info`.
    """

    def __init__(self, model: OSEDiffModel, extractor: PromptExtractor | None = None,
                 options: SROptions = SROptions()):
        self.model, self.extractor, self.options = model, extractor, options

    @classmethod
    def from_pretrained(cls, base: str | None = None, weights: str | None = None, device: str | None = None,
                        dtype: str | torch.dtype | None = "auto", *, ram: str | None = None, dape: str | None = None,
                        use_dape: bool = True, merge: bool = True, options: SROptions = SROptions(),
                        offline: bool | None = None) -> OSEDiffPipeline:
        """Load SD 2.1-base (`base`: diffusers folder, A1111/ComfyUI single file, or hub id) + OSEDiff `weights`
        (+ RAM/DAPE when found).

        Each location falls back to its environment variable and the models folder (see `osediff.weights.locate`),
        the base also to the Hugging Face cache (`osediff.weights.hfcache`).
        A weight absent from both is downloaded into the models folder on first use, unless `offline` (or
        HF_HUB_OFFLINE / OSEDIFF_OFFLINE) is set; each file is structurally checked before loading. A missing
        file raises `MissingWeightsError` saying what to download and where to put it (and why the download
        failed); a wrong one `BrokenWeightsError` (a ValueError) with a one-line reason.
        """
        from osediff.weights import locate as wts
        from osediff.weights.obtain import obtain
        dev = torch.device(device) if device else default_device()
        if not isinstance(dtype, torch.dtype):
            choice = choose_dtype(dtype, dev)
            log.info("precision %s on %s: %s", choice.name, dev, choice.reason)
            dtype = choice.name
        dt, vae_dt = resolve_dtypes(dtype, dev)
        match_reference_matmuls(dev, dt)
        base_path = obtain("base", base, offline=offline)
        weights_path = obtain("weights", weights, offline=offline, base=base_path)
        model = OSEDiffModel.from_pretrained(base_path, weights_path, device=dev, dtype=dt, merge=merge)
        if vae_dt != dt:
            model.vae.to(vae_dt)
        extractor = None
        if use_dape:
            ram_path = obtain("ram", ram, offline=offline, required=dape is not None)
            dape_path = obtain("dape", dape, offline=offline, required=ram is not None)
            if ram_path is None or dape_path is None:
                log.warning("DAPE not used (no RAM/DAPE weights found): prompts carry no tags, so outputs will "
                            "differ from the published ones.\n%s", wts.missing_message("dape"))
            else:
                from osediff.dape import RAMTagger

                extractor = RAMTagger.from_files(ram_path, dape_path, device=dev, dtype=dt)
        return cls(model, extractor, options)

    def with_options(self, **changes) -> OSEDiffPipeline:
        return OSEDiffPipeline(self.model, self.extractor, replace(self.options, **changes))

    # --- public call ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, image, prompt: str | None = None, *, progress: Progress | None = None):
        """`progress(stage, done, total)` is told as each stage starts: "tags", "encode", "unet" (per tile
        batch), "decode", "color_fix"; an exception raised in it aborts the run (a front-end's cancel)."""
        from PIL import Image

        if isinstance(image, torch.Tensor):
            return self._tensor(image, prompt, progress=progress)[0]
        if isinstance(image, Image.Image):
            from osediff.files.images import from_pil, to_pil
            from osediff.files.metadata import read_metadata

            # the pixels are used as given (not EXIF-rotated), so the output keeps the input's orientation tag
            meta = replace(read_metadata(image), upright=False)
            out, _ = self.run_picture(from_pil(image, meta), prompt, progress=progress)
            return to_pil(out)
        if isinstance(image, np.ndarray):
            return self._numpy(image, prompt, progress)
        raise TypeError(f"expected a PIL image, numpy array or tensor, got {type(image).__name__}")

    def plan(self, w: int, h: int) -> SizePlan:
        """The sizes a w×h input goes through (`osediff.core.resample.plan_sizes`); says when the guard is
        capped or the work is huge."""
        o = self.options
        out = output_size(w, h, o.scale, o.long_side, o.size)
        p = plan_sizes(w, h, out, o.process_size, o.max_guard_megapixels)
        if p.capped:
            log.warning("%dx%d: the small-input guard would process more than %g megapixels; enlarging only to "
                        "%dx%d (--max-guard-megapixels %g; 0 lifts the cap)", w, h, o.max_guard_megapixels,
                        *p.up, o.max_guard_megapixels)
        if o.size is not None and abs(out[0] / w - out[1] / h) > 0.01 * max(out[0] / w, out[1] / h):
            log.warning("%dx%d -> --size %dx%d changes the aspect ratio (the image is stretched)", w, h, *out)
        _warn_if_huge(p.up)
        return p

    # --- entry points by input kind -----------------------------------------------------------------------
    def _numpy(self, a: np.ndarray, prompt: str | None, progress: Progress | None = None):
        if a.dtype in (np.uint8, np.uint16):
            rgb = a[..., :3] if a.ndim == 3 else a
            rgb = np.repeat(rgb[..., None], 3, axis=2) if rgb.ndim == 2 else (
                np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb)
            alpha = a[..., 3] if a.ndim == 3 and a.shape[2] == 4 else None
            out, _ = self.run_picture(Picture(np.ascontiguousarray(rgb), alpha), prompt, progress=progress)
            return out.rgb if out.alpha is None else np.dstack([out.rgb, out.alpha])
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1)[None]
        return self._tensor(t, prompt, progress=progress)[0][0].permute(1, 2, 0).numpy()

    def _tensor(self, x: torch.Tensor, prompt: str | None, p: SizePlan | None = None,
                progress: Progress | None = None) -> tuple[torch.Tensor, list[str]]:
        """(B,3,H,W) float [0,1] -> ((B,3,H',W') float [0,1] on x's device, prompts); float path throughout."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B,3,H,W) tensor, got shape {tuple(x.shape)}")
        h0, w0 = x.shape[-2:]
        p = p or self.plan(w0, h0)
        xd = x.to(self.model.device, torch.float32)
        if p.guard:
            xd = resize_bicubic(xd, (p.guard[1], p.guard[0]))
        x_up = resize_bicubic(xd, (p.up[1], p.up[0])).clamp(0, 1)
        out, prompts = self._restore(x_up, prompt, quantize=False, progress=progress)
        if p.up != p.out:
            out = resize_bicubic(out, (p.out[1], p.out[0])).clamp(0, 1)
        return out.to(x.device), prompts

    def run_picture(self, pic: Picture, prompt: str | None = None, *, progress: Progress | None = None,
                    ) -> tuple[Picture, str]:
        """A decoded file in, its SR out (+ the prompt used). 8-bit images follow the reference bit for bit
        (PIL resizes, floor quantisation; any scale uses the same PIL calls); 16-bit images take the float
        path and stay 16-bit."""
        return self.run_pictures([pic], prompt, progress=progress)[0]

    @torch.inference_mode()
    def run_pictures(self, pics: list[Picture], prompt: str | None = None, *, progress: Progress | None = None,
                     ) -> list[tuple[Picture, str]]:
        """`run_picture` for several pictures of one size and bit depth, run through the networks as one batch
        (the same results as one at a time, up to float rounding; with `sample_latent` the noise differs).
        Each result keeps its input's `gray` and `meta`."""
        from PIL import Image

        (w0, h0), bits = pics[0].size, pics[0].bits
        if any(p.size != (w0, h0) or p.bits != bits for p in pics):
            raise ValueError("run_pictures needs pictures of one size and bit depth")
        plan = self.plan(w0, h0)
        if bits == 8:
            ups = []
            for pic in pics:
                im = Image.fromarray(pic.rgb, "RGB")
                if plan.guard:
                    im = im.resize(plan.guard, Image.BICUBIC)
                ups.append(np.array(im.resize(plan.up, Image.BICUBIC)))
            # contiguous NCHW like ToTensor: a channels-last view would select other conv kernels (other rounding)
            x_up = torch.from_numpy(np.stack(ups)).permute(0, 3, 1, 2).contiguous().float().div(255)
            out, prompts = self._restore(x_up.to(self.model.device), prompt, quantize=True, progress=progress)
            rgbs = list(out.permute(0, 2, 3, 1).cpu().numpy())
            if plan.up != plan.out:
                rgbs = [np.asarray(Image.fromarray(r, "RGB").resize(plan.out, Image.BICUBIC)) for r in rgbs]
            alphas = [None if p.alpha is None else
                      np.asarray(Image.fromarray(p.alpha, "L").resize(plan.out, Image.BICUBIC)) for p in pics]
        else:
            # in place where it can be: a 24-MP 16-bit photo is 290 MB per float32 copy
            x = np.stack([p.rgb for p in pics]).astype(np.float32)
            x /= 65535
            out, prompts = self._tensor(torch.from_numpy(x).permute(0, 3, 1, 2), prompt, plan, progress)
            del x
            y = out.permute(0, 2, 3, 1).cpu().numpy()
            y *= 65535
            rgbs = list(np.round(y, out=y).astype(np.uint16))
            del y, out
            alphas = []
            for p in pics:
                if p.alpha is None:
                    alphas.append(None)
                    continue
                a = resize_bicubic(torch.from_numpy(p.alpha.astype(np.float32) / 65535)[None, None],
                                   (plan.out[1], plan.out[0]))
                alphas.append((a.clamp(0, 1)[0, 0].numpy() * 65535).round().astype(np.uint16))
        # gray-ness and metadata travel with the picture; the writer applies them
        return [(replace(p, rgb=np.ascontiguousarray(r), alpha=a), pr)
                for p, r, a, pr in zip(pics, rgbs, alphas, prompts)]

    # --- the model part -----------------------------------------------------------------------------------
    def _restore(self, x_up: torch.Tensor, prompt: str | None, quantize: bool, progress: Progress | None = None,
                 ) -> tuple[torch.Tensor, list[str]]:
        """Steps 3–6: upscaled (B,3,H,W) [0,1] -> SR (B,3,H,W) and the prompts used. The SR image is float32
        in [0,1], or with `quantize` uint8 after the reference's floor / colour fix / floor (spec §1.10)."""
        o, m = self.options, self.model
        x_up = x_up.contiguous()
        report = progress or (lambda stage, done, total: None)
        x, (h, w) = pad_to_multiple(x_up, 8)
        report("tags", 0, 1)
        prompts = build_prompts(x_up, self.extractor, o.prompt if prompt is None else prompt)
        generator = None
        if o.sample_latent:
            # one generator per call, seeded by --seed (else a fresh random seed, without touching torch's global RNG)
            generator = torch.Generator(device=m.device)
            if o.seed is not None:
                generator.manual_seed(o.seed)
            else:
                generator.seed()
        embeds = m.encode_text(prompts)
        # within --max-memory: idle weights parked and tile states spilled while needed, back / removed on exit
        with MemorySession(choose_budget(o.max_memory, m.device), m.device, o.spill_dir) as memory:
            y = m(x * 2 - 1, embeds, sample=o.sample_latent, generator=generator, tile=o.tile,
                  tile_overlap=o.tile_overlap, tile_batch=o.tile_batch, vae_encoder_tile=o.vae_encoder_tile,
                  vae_decoder_tile=o.vae_decoder_tile, vae_offload="cpu" if o.vae_offload else None,
                  progress=progress, memory=memory)
            del x
            report("color_fix", 0, 1)
            y01 = y[..., :h, :w] * 0.5 + 0.5
            if not quantize:
                return color_fix(y01.float(), x_up, o.color_fix), prompts
            q = to_uint8(y01).cpu()
            del y, y01
            if o.color_fix in ("none", "nofix"):
                return q, prompts
            # on the CPU in fp32, as the reference (a GPU's TF32 convolutions would change the wavelet fix)
            return to_uint8(color_fix(q.float() / 255, x_up.cpu(), o.color_fix)), prompts
