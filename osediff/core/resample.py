"""Image resampling that reproduces Pillow exactly, on any torch device, and reflect padding to a multiple.

The reference upscales with PIL's BICUBIC (Keys a = −0.5, antialiased when downscaling). torch's bicubic uses
a = −0.75 and a different border rule, so we rebuild PIL's separable weight matrices (same support, same
per-pixel normalisation at the borders) and apply them as two matmuls. For 8-bit PIL images the pipeline calls
PIL itself (bit-exact, including its 8-bit rounding); this module serves float tensors of any bit depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@lru_cache(maxsize=64)
def pil_bicubic_taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's BICUBIC resample along one axis as taps: (first (out_size,) int64, weights (out_size, K) float64)
    with out[i] = sum_k weights[i, k] * in[first[i] + k]; K = the widest support, padded with zero weights
    (their indices stay inside the input). O(out_size * K) memory instead of a dense out x in matrix."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)  # >1 widens the kernel when downscaling (antialias)
    support = 2.0 * filterscale
    rows = []
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = [_bicubic((j - center + 0.5) / filterscale) for j in range(lo, hi)]
        total = sum(w)
        rows.append((lo, [wj / total if total else 0.0 for wj in w]))
    k = max(len(w) for _, w in rows)
    first = torch.tensor([min(lo, in_size - k) for lo, _ in rows], dtype=torch.int64)  # keep padded taps inside
    weights = torch.zeros(out_size, k, dtype=torch.float64)
    for i, (lo, w) in enumerate(rows):
        off = lo - int(first[i])
        weights[i, off:off + len(w)] = torch.tensor(w, dtype=torch.float64)
    return first, weights


def pil_bicubic_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) float64 matrix M with out = M @ in, equal to PIL's BICUBIC resample along one axis
    (the dense form of `pil_bicubic_taps`, for small sizes and tests)."""
    first, weights = pil_bicubic_taps(in_size, out_size)
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    cols = first[:, None] + torch.arange(weights.shape[1])
    m.scatter_add_(1, cols, weights)
    return m


def _resize_axis(x: torch.Tensor, dim: int, out_size: int, block: int = 128) -> torch.Tensor:
    """Resample float32 `x` along `dim` (-2 rows, -1 columns) block by block: `block` output rows (columns)
    depend only on a narrow band of input rows (columns), so each block is one small dense matmul with the
    band (BLAS speed) written into the result. Work ~ output size x band width; beyond the input and the
    result only one block is held, whatever the image size."""
    first, weights = pil_bicubic_taps(x.shape[dim], out_size)
    k = weights.shape[1]
    shape = list(x.shape)
    shape[dim] = out_size
    out = torch.empty(shape, dtype=torch.float32, device=x.device)
    for s in range(0, out_size, block):
        e = min(s + block, out_size)
        lo, hi = int(first[s]), int(first[s:e].max()) + k
        m = torch.zeros(e - s, hi - lo, dtype=torch.float64)
        m.scatter_add_(1, first[s:e, None] - lo + torch.arange(k), weights[s:e])
        m = m.to(device=x.device, dtype=torch.float32)
        band = x.narrow(dim, lo, hi - lo)
        y = m @ band if dim == -2 else band @ m.T  # (..., e-s, W) / (..., H, e-s)
        out.narrow(dim, s, e - s).copy_(y)
    return out


def resize_bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL-BICUBIC resize of (B, C, H, W) float to (B, C, *size) with size = (height, width); no clamping.
    Rows first, then columns, in float32: the dense `M_y @ x @ M_x^T` of `pil_bicubic_matrix` up to float
    rounding, but linear in the image size (a 24-megapixel picture needs no 24000 x 6000 matrix)."""
    h, w = x.shape[-2:]
    y = x.float()
    if size[0] != h:
        y = _resize_axis(y, -2, size[0])
    if size[1] != w:
        y = _resize_axis(y, -1, size[1])
    return (y.clone() if y is x else y).to(x.dtype)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad (B, C, H, W) at the bottom/right so H and W are multiples of `multiple`; returns the padded
    tensor and the original (H, W) for cropping back. Replicate padding covers sides too short to reflect."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def guard_size(w: int, h: int, scale: float, process_size: int) -> tuple[int, int] | None:
    """The reference's small-input guard (spec §1.3 step 2): the pre-upscale size when a side is below
    process_size // scale, else None. Exactly the reference's numbers for integer scales."""
    floor = int(process_size // scale)
    if w >= floor and h >= floor:
        return None
    s = floor / min(w, h)
    return max(1, int(s * w)), max(1, int(s * h))


def _round_half_up(x: float) -> int:
    return max(1, math.floor(x + 0.5))


def output_size(w: int, h: int, scale: float = 4, long_side: int | None = None,
                size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The output (width, height) for a w×h input: `size` as given; else the long side made `long_side` with
    the aspect kept; else round(scale·w) × round(scale·h), rounded half up (exactly s·w × s·h for integer s)."""
    if size is not None:
        return size
    if long_side is not None:
        s = long_side / max(w, h)
        return (long_side, _round_half_up(s * h)) if w >= h else (_round_half_up(s * w), long_side)
    return _round_half_up(scale * w), _round_half_up(scale * h)


@dataclass(frozen=True)
class SizePlan:
    """The sizes (width, height) one input goes through: guard (None: not enlarged) -> up, what the networks
    process -> out, the result. `capped`: the guard was held back by `max_guard_megapixels`."""

    guard: tuple[int, int] | None
    up: tuple[int, int]
    out: tuple[int, int]
    capped: bool = False


def plan_sizes(w: int, h: int, out: tuple[int, int], process_size: int,
               max_guard_megapixels: float = 0) -> SizePlan:
    """The reference's guard + bicubic upscale, generalised to any output size, with a cap.

    The per-axis factors are sx = out_w / w, sy = out_h / h (both s for an integer scale s); the guard uses
    s = min(sx, sy). The image the networks see is (round(sx·gw), round(sy·gh)) for the guarded size (gw, gh),
    which for integer scales is the reference's gw·s × gh·s. The rule for extreme aspect ratios: the guard
    only enlarges while the processed image stays within `max_guard_megapixels` (0 = no cap, the reference);
    past it the guard factor shrinks to fit (down to no guard at all), so a 2000×2 strip is not turned into
    512000×512. The result is `out` either way.
    """
    sx, sy = out[0] / w, out[1] / h
    guard = guard_size(w, h, min(sx, sy), process_size)
    if guard is None:
        return SizePlan(None, out, out)
    up = (_round_half_up(sx * guard[0]), _round_half_up(sy * guard[1]))
    cap = max_guard_megapixels * 1e6
    if not cap or up[0] * up[1] <= cap:
        return SizePlan(guard, up, out)
    g = math.sqrt(cap / (w * h * sx * sy))  # the guard factor whose processed area is the cap
    if g <= 1:
        return SizePlan(None, out, out, capped=True)
    guard = (max(1, int(g * w)), max(1, int(g * h)))
    return SizePlan(guard, (_round_half_up(sx * guard[0]), _round_half_up(sy * guard[1])), out, capped=True)
