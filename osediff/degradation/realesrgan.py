"""Real-ESRGAN second-order degradation, batched in torch (spec §4.2 step 4, §4.3; the reference's
`dataloaders/realesrgan.py: RealESRGAN_degradation.degrade_process`).

`degrade(hq, cfg, generator)` turns HQ crops `(B, 3, H, W)` in [0, 1] into LQ images with

    stage 1   blur k1 -> resize up/down/keep -> Gaussian or Poisson noise -> JPEG
    stage 2   blur k2 (p 0.8) -> resize to (H/4·s, W/4·s) -> noise
    final     p 0.5: resize to H/4 -> sinc -> JPEG,   else: JPEG -> resize to H/4 -> sinc
    back      resize to (H, W) (resize_back=True) -> quantise to the 8-bit grid

on the images' device. Every random choice comes from the explicit `generator`, and the reference draws all of
them per image (it degrades one image at a time inside the dataset), so each batch element here gets its own
kernels, resize kind/scale/mode, noise kind/level, JPEG qualities and final order. (Real-ESRGAN's own GPU
trainer instead shares the resize scale/mode, noise kind, second blur and final order across a batch; OSEDiff
does not, and neither do we.) The same generator state and batch give the same output.
JPEG quantises with the tables oriented as the authors' DiffJPEG does (`cfg.jpeg_tables`, see `jpeg.py`).

After the first resize the images no longer share a size, so the middle of the pipeline works on a list of
`(1, 3, h, w)` tensors; blur, noise and JPEG still run as one batched call per group of equal shapes.

Left to the dataset: the reference's extra random horizontal flip (basicsr `augment`) inside
`degrade_process`, and the 512 crop. Not supported: `gray_prob` / `color_jitter_prob` > 0 (0 in the shipped
file; the gray path would return a 1-channel LQ, spec §8.21).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from osediff.degradation import kernels as K
from osediff.degradation.jpeg import jpeg
from osediff.degradation.jpeg_tables import JPEG_TABLES, JpegTables

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")
UP, DOWN, KEEP = 0, 1, 2  # order of `resize_prob`
MIN_KERNEL = 7  # per-sample kernel sizes are 7, 9, ..., blur_kernel_size


# ----------------------------------------------------------------------------------------------- config


def _check_probs(name: str, probs: Sequence[float], n: int) -> None:
    if len(probs) != n or any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
        raise ValueError(f"{name} must be {n} non-negative probabilities summing to 1, got {tuple(probs)}")


@dataclass(frozen=True)
class KernelInfo:
    """The `kernel_info` block of `params_realesrgan.yml`; defaults are the shipped file."""

    blur_kernel_size: int = 21
    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)

    blur_kernel_size2: int = 21
    kernel_list2: tuple[str, ...] = KERNEL_TYPES
    kernel_prob2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)

    final_sinc_prob: float = 0.8

    def __post_init__(self) -> None:
        for suffix in ("", "2"):
            size = getattr(self, "blur_kernel_size" + suffix)
            if size % 2 != 1 or size < MIN_KERNEL:
                raise ValueError(f"blur_kernel_size{suffix} must be odd and >= {MIN_KERNEL}, got {size}")
            names, probs = getattr(self, "kernel_list" + suffix), getattr(self, "kernel_prob" + suffix)
            if unknown := set(names) - set(KERNEL_TYPES):
                raise ValueError(f"kernel_list{suffix}: unknown kernel types {sorted(unknown)}")
            _check_probs("kernel_prob" + suffix, probs, len(names))
        if self.blur_kernel_size != self.blur_kernel_size2:
            raise ValueError("blur_kernel_size and blur_kernel_size2 must match (one padded kernel size)")


@dataclass(frozen=True)
class DegradationConfig:
    """`params_realesrgan.yml` as a frozen dataclass (same keys); defaults are the shipped file (spec §4.3)."""

    scale: int = 4
    color_jitter_prob: float = 0.0
    gray_prob: float = 0.0

    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)

    second_blur_prob: float = 0.8
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)

    kernel_info: KernelInfo = dataclasses.field(default_factory=KernelInfo)

    # Not in the reference's YAML (may be absent from a file): the JPEG tables' orientation, see `jpeg.py`.
    # "reference" = the authors' DiffJPEG (tables transposed), "standard" = libjpeg's / real JPEG files'.
    jpeg_tables: JpegTables = dataclasses.field(default="reference", metadata={"optional": True})

    def __post_init__(self) -> None:
        if self.jpeg_tables not in JPEG_TABLES:
            raise ValueError(f"jpeg_tables must be one of {JPEG_TABLES}, got {self.jpeg_tables!r}")
        if self.gray_prob or self.color_jitter_prob:
            raise ValueError("gray_prob and color_jitter_prob > 0 are not supported (the reference ships 0; "
                             "its gray path returns a 1-channel LQ, spec §8.21)")
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")
        _check_probs("resize_prob", self.resize_prob, 3)
        _check_probs("resize_prob2", self.resize_prob2, 3)
        for name in ("resize_range", "resize_range2"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= 1 <= hi:
                raise ValueError(f"{name} must satisfy 0 < low <= 1 <= high, got {(lo, hi)}")

    @classmethod
    def from_yaml(cls, path: str | Path | None = None) -> DegradationConfig:
        """Read a `params_realesrgan.yml`-style file (default: the one shipped in `osediff/data`)."""
        return config_from_mapping(cls, read_yaml(path, "params_realesrgan.yml"))


def read_yaml(path: str | Path | None, default_name: str) -> dict[str, Any]:
    """A YAML mapping from `path`, or the packaged `osediff/data/<default_name>` when `path` is None."""
    try:
        import yaml  # the `train` extra
    except ImportError as e:
        raise ImportError("reading degradation configs needs pyyaml: pip install 'osediff[train]'") from e

    text = (resources.files("osediff") / "data" / default_name).read_text() if path is None \
        else Path(path).read_text()
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path or default_name}: expected a YAML mapping")
    return data


def config_from_mapping(cls: type, data: dict[str, Any]):
    """Build a (possibly nested) frozen dataclass from a YAML mapping; keys must match the fields exactly, except
    that fields marked `metadata={"optional": True}` (osediff's additions) may be left out."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    if unknown := set(data) - fields:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    optional = {f.name for f in dataclasses.fields(cls) if f.metadata.get("optional")}
    if missing := fields - set(data) - optional:
        raise ValueError(f"{cls.__name__}: missing keys {sorted(missing)}")
    kw = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            value = config_from_mapping(tp, value)
        elif typing.get_origin(tp) is tuple:
            value = tuple(float(v) if typing.get_args(tp)[0] is float else v for v in value)
        elif tp is float:
            value = float(value)
        kw[name] = value
    return cls(**kw)


# ------------------------------------------------------------------------------------------ random draws


def _rand(generator: torch.Generator, n: int) -> Tensor:
    """(n,) float64 uniform [0, 1) on the CPU, drawn on the generator's device."""
    return torch.rand(n, dtype=torch.float64, generator=generator, device=generator.device).cpu()


def uniform(generator: torch.Generator, n: int, low: float, high: float) -> Tensor:
    """(n,) float64 uniform in [low, high), on the CPU."""
    return low + (high - low) * _rand(generator, n)


def bernoulli(generator: torch.Generator, n: int, p: float) -> Tensor:
    """(n,) bool, True with probability p."""
    return _rand(generator, n) < p


def categorical(generator: torch.Generator, n: int, probs: Sequence[float]) -> Tensor:
    """(n,) int64 indices drawn with the given probabilities."""
    cdf = torch.tensor(probs, dtype=torch.float64).cumsum(0)
    idx = torch.searchsorted(cdf / cdf[-1], _rand(generator, n), right=True)
    return idx.clamp_max(len(probs) - 1)


def sample_mixed_kernels(generator: torch.Generator, n: int, size: int, kernel_list: Sequence[str],
                         kernel_prob: Sequence[float], sigma_range: tuple[float, float],
                         betag_range: tuple[float, float] = (0.5, 8.0),
                         betap_range: tuple[float, float] = (0.5, 8.0)) -> tuple[Tensor, Tensor]:
    """Per-sample kernel type and `(n, size, size)` float64 kernel (BasicSR `random_mixed_kernels` semantics).

    σx, σy ~ U(sigma_range), θ ~ U[-π, π]; the `*_iso` types use σy = σx, θ = 0. The shape β of the generalized
    and plateau kernels is U[β_lo, 1] or U[1, β_hi] with probability 1/2 each. Returns `(kind, kernel)` with
    `kind` indexing `kernel_list`.
    """
    kind = categorical(generator, n, kernel_prob)
    sx = uniform(generator, n, *sigma_range)
    sy = uniform(generator, n, *sigma_range)
    theta = uniform(generator, n, -math.pi, math.pi)
    below_one = bernoulli(generator, n, 0.5)
    u = _rand(generator, n)

    names = [kernel_list[i] for i in kind.tolist()]
    iso = torch.tensor([name == "iso" or name.endswith("_iso") for name in names], dtype=torch.bool)
    sy, theta = torch.where(iso, sx, sy), torch.where(iso, 0.0, theta)
    beta_g = torch.where(below_one, betag_range[0] + (1 - betag_range[0]) * u, 1 + (betag_range[1] - 1) * u)
    beta_p = torch.where(below_one, betap_range[0] + (1 - betap_range[0]) * u, 1 + (betap_range[1] - 1) * u)

    # "iso"/"aniso" -> "gaussian", "generalized_iso" -> "generalized", "plateau_aniso" -> "plateau"
    family = [name.split("_")[0] if "_" in name else "gaussian" for name in names]
    out = torch.empty(n, size, size, dtype=torch.float64)
    for fam, build in (
        ("gaussian", lambda m: K.gaussian_kernel(size, sx[m], sy[m], theta[m])),
        ("generalized", lambda m: K.generalized_gaussian_kernel(size, sx[m], sy[m], theta[m], beta_g[m])),
        ("plateau", lambda m: K.plateau_kernel(size, sx[m], sy[m], theta[m], beta_p[m])),
    ):
        m = torch.tensor([f == fam for f in family], dtype=torch.bool)
        if m.any():
            out[m] = build(m)
    return kind, out


@dataclass(frozen=True)
class KernelDraw:
    """Blur kernels of one stage: `sinc` (N,) bool, `kind` (N,) index into the kernel list (where not sinc),
    `size` (N,) odd support, `kernel` (N, K, K) float32 summing to 1."""

    sinc: Tensor
    kind: Tensor
    size: Tensor
    kernel: Tensor


@dataclass(frozen=True)
class StageDraw:
    """One degradation stage's per-sample choices, all (N,) CPU tensors.

    `updown` is UP/DOWN/KEEP, `scale` its factor (1 for KEEP), `mode` an index into RESIZE_MODES; `sigma` is
    on the 0…255 scale; `gray` applies to whichever noise kind `gaussian` selects.
    """

    kernel: KernelDraw
    blur: Tensor
    updown: Tensor
    scale: Tensor
    mode: Tensor
    gaussian: Tensor
    sigma: Tensor
    poisson_scale: Tensor
    gray: Tensor
    quality: Tensor


@dataclass(frozen=True)
class DegradationDraw:
    """All random choices of `degrade` for a batch except the noise fields themselves."""

    stage1: StageDraw
    stage2: StageDraw
    final_sinc: Tensor  # (N,) bool: final sinc filter, else identity
    final_kernel: Tensor  # (N, K, K) float32
    resize_first: Tensor  # (N,) bool: [resize -> sinc] -> JPEG, else JPEG -> [resize -> sinc]
    final_mode: Tensor
    final_quality: Tensor
    back_mode: Tensor  # mode of the resize back to (H, W)


def _sample_sizes(generator: torch.Generator, n: int, max_size: int) -> Tensor:
    choices = (max_size - MIN_KERNEL) // 2 + 1
    return MIN_KERNEL + 2 * categorical(generator, n, [1.0 / choices] * choices)


def _sample_blur(generator: torch.Generator, n: int, info: KernelInfo, suffix: str) -> KernelDraw:
    """Stage kernel: sinc with `sinc_prob` (ωc ~ U[π/3, π] below size 13, else U[π/5, π]), else mixed."""
    grid = info.blur_kernel_size
    size = _sample_sizes(generator, n, grid)
    sinc = bernoulli(generator, n, getattr(info, "sinc_prob" + suffix))
    u = _rand(generator, n)
    low = torch.where(size < 13, math.pi / 3, math.pi / 5).double()
    cutoff = low + (math.pi - low) * u
    kind, mixed = sample_mixed_kernels(
        generator, n, grid, getattr(info, "kernel_list" + suffix), getattr(info, "kernel_prob" + suffix),
        getattr(info, "blur_sigma" + suffix), getattr(info, "betag_range" + suffix),
        getattr(info, "betap_range" + suffix))
    kernel = torch.where(sinc[:, None, None], K.sinc_kernel(grid, cutoff), mixed)
    return KernelDraw(sinc, kind, size, K.truncate(kernel, size).float())


def _sample_stage(generator: torch.Generator, n: int, cfg: DegradationConfig, suffix: str) -> StageDraw:
    c = lambda name: getattr(cfg, name + suffix)  # noqa: E731
    kernel = _sample_blur(generator, n, cfg.kernel_info, suffix)
    blur = bernoulli(generator, n, cfg.second_blur_prob) if suffix else torch.ones(n, dtype=torch.bool)
    updown = categorical(generator, n, c("resize_prob"))
    low, high = c("resize_range")
    u = _rand(generator, n)
    scale = torch.where(updown == UP, 1 + (high - 1) * u, torch.where(updown == DOWN, low + (1 - low) * u, 1.0))
    return StageDraw(
        kernel=kernel, blur=blur, updown=updown, scale=scale,
        mode=categorical(generator, n, [1 / 3] * 3),
        gaussian=bernoulli(generator, n, c("gaussian_noise_prob")),
        sigma=uniform(generator, n, *c("noise_range")),
        poisson_scale=uniform(generator, n, *c("poisson_scale_range")),
        gray=bernoulli(generator, n, c("gray_noise_prob")),
        quality=uniform(generator, n, *c("jpeg_range")),
    )


def sample_degradation(cfg: DegradationConfig, n: int, generator: torch.Generator) -> DegradationDraw:
    """Draw every per-sample choice of spec §4.3 for a batch of `n` (the noise fields are drawn in `degrade`).

    Each quantity is drawn for all samples whether or not it ends up used, so the generator advances by the
    same amount whatever the outcomes.
    """
    info = cfg.kernel_info
    stage1 = _sample_stage(generator, n, cfg, "")
    stage2 = _sample_stage(generator, n, cfg, "2")
    final_sinc = bernoulli(generator, n, info.final_sinc_prob)
    size = _sample_sizes(generator, n, info.blur_kernel_size)
    cutoff = uniform(generator, n, math.pi / 3, math.pi)
    sinc = K.truncate(K.sinc_kernel(info.blur_kernel_size, cutoff), size).float()
    pulse = K.pulse_kernel(n, info.blur_kernel_size)
    return DegradationDraw(
        stage1=stage1, stage2=stage2, final_sinc=final_sinc,
        final_kernel=torch.where(final_sinc[:, None, None], sinc, pulse),
        resize_first=bernoulli(generator, n, 0.5),
        final_mode=categorical(generator, n, [1 / 3] * 3),
        final_quality=uniform(generator, n, *cfg.jpeg_range2),
        back_mode=categorical(generator, n, [1 / 3] * 3),
    )


# ------------------------------------------------------------------------------------------- operations


def blur(x: Tensor, kernel: Tensor) -> Tensor:
    """Filter each image of `x` (N, C, H, W) with its own `kernel` (N, K, K), reflect padding (BasicSR
    `filter2D`; = cv2's default BORDER_REFLECT_101). Correlation, which equals convolution for these kernels."""
    n, c, h, w = x.shape
    pad = kernel.shape[-1] // 2
    if pad >= min(h, w):
        raise ValueError(f"image {h}x{w} is too small for a {2 * pad + 1}-tap reflect-padded blur")
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(1, n * c, h + 2 * pad, w + 2 * pad)
    weight = kernel.to(x).repeat_interleave(c, dim=0)[:, None]  # (N·C, 1, K, K)
    return F.conv2d(xp, weight, groups=n * c).reshape(n, c, h, w)


def resize(x: Tensor, mode: str, size: tuple[int, int] | None = None,
           scale_factor: float | None = None) -> Tensor:
    """`F.interpolate` as the reference calls it (no antialiasing; align_corners=False for (bi)linear/cubic)."""
    extra = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(x, size=size, scale_factor=scale_factor, mode=mode, **extra)


def add_gaussian_noise(x: Tensor, sigma: Tensor, gray: Tensor, generator: torch.Generator) -> Tensor:
    """`clamp(x + σ/255 · n)` with n ~ N(0, 1) per pixel and channel, or shared by the channels where `gray`.

    x (N, C, h, w); sigma (N,) on the 0…255 scale; gray (N,) bool.
    """
    n, c, h, w = x.shape
    dev = generator.device
    sig = sigma.to(dev, x.dtype)[:, None, None, None] / 255
    noise = torch.randn(n, c, h, w, generator=generator, device=dev, dtype=x.dtype) * sig
    if gray.any():
        mono = torch.randn(n, 1, h, w, generator=generator, device=dev, dtype=x.dtype) * sig
        noise = torch.where(gray.to(dev)[:, None, None, None], mono, noise)
    return (x + noise.to(x.device)).clamp(0, 1)


def _shot_noise(img: Tensor, generator: torch.Generator) -> Tensor:
    """Shot noise of `img` (N, C, h, w): with `λ` the image rounded to 8 bits and `v = 2^⌈log2(#levels)⌉` for
    its number of distinct levels (skimage's `random_noise(mode='poisson')` rule, as BasicSR), returns
    `poisson(λ·v)/v − λ`."""
    n = img.shape[0]
    levels8 = (img.clamp(0, 1) * 255).round()
    img = levels8 / 255
    codes = levels8.long().flatten(1) + 256 * torch.arange(n, device=img.device)[:, None]
    distinct = torch.bincount(codes.flatten(), minlength=256 * n).view(n, 256).gt(0).sum(1)
    vals = torch.exp2(torch.ceil(torch.log2(distinct.double()))).to(img.dtype)[:, None, None, None]
    dev = generator.device
    out = torch.poisson((img * vals).to(dev), generator=generator).to(img.device) / vals
    return out - img


def add_poisson_noise(x: Tensor, scale: Tensor, gray: Tensor, generator: torch.Generator) -> Tensor:
    """`clamp(x + scale · shot_noise)`, the noise from the luma (0.2989 R + 0.587 G + 0.114 B, torchvision's
    grayscale) where `gray`. x (N, 3, h, w); scale (N,); gray (N,) bool."""
    noise = _shot_noise(x, generator)
    if gray.any():
        luma = (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        noise = torch.where(gray.to(x.device)[:, None, None, None], _shot_noise(luma, generator), noise)
    return (x + noise * scale.to(x)[:, None, None, None]).clamp(0, 1)


def quantise(x: Tensor) -> Tensor:
    """Round to the 8-bit grid: `clamp(round(255 x), 0, 255) / 255` (spec §4.3 step 6)."""
    return (x * 255).round().clamp(0, 255) / 255


def _map_groups(xs: list[Tensor], fn: Callable[[Tensor, Tensor], Tensor],
                mask: Tensor | None = None) -> list[Tensor]:
    """Apply a batched `fn(batch, index)` to the samples selected by `mask`, one call per group of equal shapes.

    `index` (n,) holds the samples' positions in `xs`, to pick their per-sample parameters.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(xs):
        if mask is None or bool(mask[i]):
            groups.setdefault(tuple(x.shape), []).append(i)
    out = list(xs)
    for members in groups.values():
        y = fn(torch.cat([xs[i] for i in members]), torch.tensor(members))
        for j, i in enumerate(members):
            out[i] = y[j:j + 1]
    return out


def _noise(xs: list[Tensor], s: StageDraw, generator: torch.Generator) -> list[Tensor]:
    def gaussian(b: Tensor, i: Tensor) -> Tensor:
        return add_gaussian_noise(b, s.sigma[i], s.gray[i], generator)

    def poisson(b: Tensor, i: Tensor) -> Tensor:
        return add_poisson_noise(b, s.poisson_scale[i], s.gray[i], generator)

    return _map_groups(_map_groups(xs, gaussian, s.gaussian), poisson, ~s.gaussian)


def _jpeg(quality: Tensor, tables: JpegTables) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda b, i: jpeg(b.clamp(0, 1), quality[i].to(b.device), tables=tables)


def check_input(hq: Tensor, cfg: DegradationConfig) -> None:
    """Raise ValueError unless `hq` is (B, 3, H, W) floating point in [0, 1] and large enough for `cfg`."""
    if hq.ndim != 4 or hq.shape[1] != 3 or not hq.is_floating_point():
        raise ValueError(f"expected a float (B, 3, H, W) tensor, got {tuple(hq.shape)} {hq.dtype}")
    side = min(hq.shape[-2:])
    pad = cfg.kernel_info.blur_kernel_size // 2
    if int(side * cfg.resize_range[0]) <= pad or side // cfg.scale <= pad or \
            int(side / cfg.scale * cfg.resize_range2[0]) < 1:
        raise ValueError(f"image {hq.shape[-2]}x{hq.shape[-1]} is too small for this degradation: the shorter "
                         f"side s needs int(s·{cfg.resize_range[0]}) > {pad} and s // {cfg.scale} > {pad}")
    if hq.numel() and (hq.min() < 0 or hq.max() > 1):
        raise ValueError("expected values in [0, 1]")


@torch.no_grad()
def degrade(hq: Tensor, cfg: DegradationConfig, generator: torch.Generator, resize_back: bool = True) -> Tensor:
    """Real-ESRGAN second-order degradation of a batch (spec §4.3).

    hq: (B, 3, H, W) float in [0, 1], any device; the generator should live on the same device (noise drawn
    elsewhere is moved). Returns the LQ on the 8-bit grid, in hq's dtype: (B, 3, H, W) when `resize_back`, else
    (B, 3, H // scale, W // scale). Batches are processed in float32. A given generator state and batch give
    the same output on a given device; CPU and CUDA results differ by ±1 level at many pixels (float rounding,
    and cuDNN's TF32 convolutions by default), which is immaterial for training data.
    """
    check_input(hq, cfg)
    d = sample_degradation(cfg, hq.shape[0], generator)
    h, w = hq.shape[-2:]
    s1, s2, r = d.stage1, d.stage2, cfg.scale
    mode = lambda idx: RESIZE_MODES[int(idx)]  # noqa: E731

    # 1. first degradation: blur, resize by a per-sample factor, noise, JPEG
    x = blur(hq.float(), s1.kernel.kernel)
    xs = [resize(x[i:i + 1], mode(s1.mode[i]), scale_factor=float(s1.scale[i])) for i in range(len(x))]
    xs = _noise(xs, s1, generator)
    xs = _map_groups(xs, _jpeg(s1.quality, cfg.jpeg_tables))

    # 2. second degradation: blur (p second_blur_prob), resize to (H/r·s, W/r·s), noise
    xs = _map_groups(xs, lambda b, i: blur(b, s2.kernel.kernel[i]), s2.blur)
    xs = [resize(x, mode(s2.mode[i]), size=(int(h / r * float(s2.scale[i])), int(w / r * float(s2.scale[i]))))
          for i, x in enumerate(xs)]
    xs = _noise(xs, s2, generator)

    # 3. final: [resize to (H/r, W/r) -> sinc] and JPEG, in a per-sample order
    xs = _map_groups(xs, _jpeg(d.final_quality, cfg.jpeg_tables), ~d.resize_first)
    xs = [resize(x, mode(d.final_mode[i]), size=(h // r, w // r)) for i, x in enumerate(xs)]
    xs = _map_groups(xs, lambda b, i: blur(b, d.final_kernel[i]), d.final_sinc)
    xs = _map_groups(xs, _jpeg(d.final_quality, cfg.jpeg_tables), d.resize_first)
    lq = torch.cat(xs)  # (B, 3, H/r, W/r)

    # 4. back to the HQ size with a random mode, then the 8-bit grid
    if resize_back:
        lq = torch.cat([resize(lq[i:i + 1], mode(d.back_mode[i]), size=(h, w)) for i in range(len(lq))])
    return quantise(lq).to(hq.dtype)
