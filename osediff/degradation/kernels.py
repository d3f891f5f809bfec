"""Blur kernels of the Real-ESRGAN degradation model (spec §4.3 step 1, §4.7 step 4), as pure functions.

Every function is batched: parameters are `(N,)` tensors, kernels are `(N, K, K)` tensors on the parameters'
device and dtype, each summing to 1. Positions are integer offsets from the centre pixel, `x` along columns
and `y` along rows, so an odd `K` has its centre at `(K // 2, K // 2)`.

The Gaussian family uses the rotated covariance `Σ = R(θ) diag(σx², σy²) R(θ)ᵀ` and its quadratic form
`q(x, y) = [x y] Σ⁻¹ [x y]ᵀ`:

    Gaussian               exp(-q / 2)
    generalized Gaussian   exp(-q^β / 2)         (β = 1 is the Gaussian)
    plateau                1 / (1 + q^β)
    circular sinc          ωc J1(ωc r) / (2π r),   ωc² / (4π) at r = 0   (ideal disc low-pass, cutoff ωc)

All of them are point-symmetric (`k(x, y) = k(-x, -y)`), so correlation and convolution agree.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def offsets(size: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
            ) -> tuple[Tensor, Tensor]:
    """`(x, y)` offset grids of an odd `size`, each `(size, size)`; `x` varies along columns."""
    if size % 2 != 1:
        raise ValueError(f"kernel size must be odd, got {size}")
    ax = torch.arange(size, dtype=dtype, device=device) - size // 2
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    return x, y


def quadratic_form(size: int, sigma_x: Tensor, sigma_y: Tensor, theta: Tensor) -> Tensor:
    """`q = [x y] Σ⁻¹ [x y]ᵀ` on a `size × size` grid, `(N, size, size)`.

    With `R(θ) = [[cos θ, -sin θ], [sin θ, cos θ]]`, `Σ⁻¹ = R diag(1/σx², 1/σy²) Rᵀ`, so `q` is the squared
    length of the rotated-back offset `Rᵀ [x y]ᵀ` measured in units of (σx, σy).
    """
    x, y = offsets(size, sigma_x.dtype, sigma_x.device)
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    u = c * x + s * y  # (N, K, K) coordinate along the σx axis
    v = -s * x + c * y  # along the σy axis
    return (u / sigma_x[:, None, None]) ** 2 + (v / sigma_y[:, None, None]) ** 2


def _normalise(k: Tensor) -> Tensor:
    return k / k.sum(dim=(-2, -1), keepdim=True)


def gaussian_kernel(size: int, sigma_x: Tensor, sigma_y: Tensor, theta: Tensor) -> Tensor:
    """Anisotropic Gaussian `exp(-q/2)`, normalised; isotropic when `sigma_y = sigma_x` (θ is then moot)."""
    return _normalise(torch.exp(-0.5 * quadratic_form(size, sigma_x, sigma_y, theta)))


def generalized_gaussian_kernel(size: int, sigma_x: Tensor, sigma_y: Tensor, theta: Tensor, beta: Tensor
                                ) -> Tensor:
    """Generalized Gaussian `exp(-q^β / 2)`, normalised (flat top for β > 1, peaky for β < 1)."""
    q = quadratic_form(size, sigma_x, sigma_y, theta)
    return _normalise(torch.exp(-0.5 * q ** beta[:, None, None]))


def plateau_kernel(size: int, sigma_x: Tensor, sigma_y: Tensor, theta: Tensor, beta: Tensor) -> Tensor:
    """Plateau `1 / (1 + q^β)`, normalised (heavier tails than the Gaussian)."""
    q = quadratic_form(size, sigma_x, sigma_y, theta)
    return _normalise(1.0 / (1.0 + q ** beta[:, None, None]))


def sinc_kernel(size: int, cutoff: Tensor) -> Tensor:
    """Circularly symmetric low-pass ("sinc") kernel with cutoff `ωc` in radians/pixel (π = Nyquist).

    It is the sampled impulse response of an ideal disc filter of radius ωc in the frequency plane:
    `h(r) = ωc J1(ωc r) / (2π r)`, whose limit at `r = 0` is `ωc² / (4π)`. Truncated to `size × size`, then
    normalised to sum 1 (so a constant image passes unchanged). `(N,) -> (N, size, size)`.
    """
    x, y = offsets(size, cutoff.dtype, cutoff.device)
    r = torch.sqrt(x * x + y * y)  # (K, K)
    wc = cutoff[:, None, None]
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    k = wc * torch.special.bessel_j1(wc * safe_r) / (2 * math.pi * safe_r)
    k = torch.where(r > 0, k, wc ** 2 / (4 * math.pi))
    return _normalise(k)


def truncate(kernel: Tensor, support: Tensor) -> Tensor:
    """Zero a `(N, K, K)` kernel outside its centred `support × support` square (odd sizes) and renormalise.

    Because every kernel above is a pointwise function of the offset followed by a normalisation, this equals
    building the kernel at size `support` and zero-padding it to `K`, which is what the reference does with its
    per-sample sizes 7…21, but keeps the batch in one tensor.
    """
    size = kernel.shape[-1]
    x, y = offsets(size, kernel.dtype, kernel.device)
    half = (support.to(kernel.dtype)[:, None, None] - 1) / 2
    inside = (x.abs() <= half) & (y.abs() <= half)
    return _normalise(kernel * inside)


def pulse_kernel(n: int, size: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                 ) -> Tensor:
    """Identity kernels (a single 1 at the centre), `(n, size, size)`."""
    k = torch.zeros(n, size, size, dtype=dtype, device=device)
    k[:, size // 2, size // 2] = 1
    return k
