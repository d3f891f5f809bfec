"""Colour correction of the SR output against the upscaled input (spec §1.10 step 2), as pure functions.

Both take and return (B, 3, H, W) float tensors in [0, 1]; `x` is the SR image, `ref` the ×s bicubic input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-5


def adain(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-channel AdaIN over the whole image: (x − μx)/σx·σref + μref with σ = √(unbiased var + 1e-5),
    clamped to [0, 1]. The reference's default colour fix."""
    def stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = t.flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1, unbiased=True) + _EPS).sqrt()[..., None, None]

    mx, sx = stats(x)
    mr, sr = stats(ref)
    return ((x - mx) / sx * sr + mr).clamp(0, 1)


def _blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    # 3×3 binomial kernel [[1,2,1],[2,4,2],[1,2,1]]/16, dilated, with replicate padding of `dilation`.
    k = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    k = k.expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (dilation,) * 4, mode="replicate"), k, groups=x.shape[1], dilation=dilation)


def wavelet_decompose(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): high = Σ_i (x_i − blur_i(x_i)) with dilation 2^i, low = x_levels (the 5-times blurred image)."""
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _blur(x, 2**i)
        high = high + (x - low)
        x = low
    return high, x


def wavelet(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """High frequencies of x plus low frequencies of ref, clamped to [0, 1] (spec §1.10, 'wavelet')."""
    high, _ = wavelet_decompose(x)
    _, low = wavelet_decompose(ref)
    return (high + low).clamp(0, 1)


def color_fix(x: torch.Tensor, ref: torch.Tensor, method: str) -> torch.Tensor:
    """Dispatch on `method` in {"adain", "wavelet", "none"/"nofix"}; computed in float32 like the reference."""
    if method in ("none", "nofix"):
        return x
    if method == "adain":
        return adain(x.float(), ref.float())
    if method == "wavelet":
        return wavelet(x.float(), ref.float())
    raise ValueError(f"unknown colour fix {method!r}; choose adain, wavelet or none")
