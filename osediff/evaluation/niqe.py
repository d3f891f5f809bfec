"""NIQE, the no-reference Natural Image Quality Evaluator (Mittal, Soundararajan & Bovik, IEEE SPL 2013), as the
authors measured it (spec §5.1: pyiqa 0.1.10 `create_metric('niqe')` with its defaults), in pure numpy.

The recipe, step by step (`niqe`):

1. luma: Y of YIQ, `0.299 R + 0.587 G + 0.114 B`, in float32 as pyiqa ran it on the authors' GPU (see
   `rgb_to_y255`), times 255, rounded half to even, then float64 (MATLAB's uint8 grey image). No border crop.
2. crop to whole 96×96 blocks from the top-left (the rest of the right and bottom edges is dropped).
3. at two scales — the cropped image, then the same image halved by MATLAB's `imresize` (bicubic with
   antialiasing, symmetric borders; run in float32 on Y/255, as pyiqa's port casts to float32, with its
   summation order):
   - MSCN coefficients `(Y − μ) / (σ + 1)`, μ and σ from a 7×7 Gaussian window σ_w = 7/6 with replicated
     borders (`σ = sqrt(|E[Y²] − μ²| + eps)`);
   - per block (96×96, then 48×48) the 18 features of the paper: an AGGD fit of the coefficients (shape,
     mean scale) and of their products with the 4 circularly shifted neighbours (shape, mean, left and right
     scales). Shapes are looked up on pyiqa's grid 0.2, 0.201, ..., 10.
4. fit a Gaussian (mean, covariance) to the 36-feature blocks, ignoring NaN (a block with no negative or no
   positive coefficient): column-wise nanmean, covariance over the NaN-free rows.
5. `NIQE = sqrt((μ_p − μ)ᵀ pinv((Σ_p + Σ)/2) (μ_p − μ))` against the pristine model μ_p, Σ_p.

The pristine model is MATLAB's `modelparameters.mat` of the NIQE release, shipped as
`osediff/data/niqe_pris_params.npz` (a verbatim copy of the file in the Apache-2.0 `basicsr` 1.4.2 sdist).
On the 100 RealSR images this reproduces the authors' per-image log to 2e-5 (the log has 6 decimals) and its
mean 5.6476 (tests/evaluation/test_niqe.py). Lower is better.
"""

from __future__ import annotations

import math
from functools import lru_cache
from importlib.resources import files

import numpy as np

BLOCK = 96  # the NIQE release's recommended block size (pyiqa's default)
WINDOW = 7  # MSCN Gaussian window, σ = 7/6
WINDOW_SIGMA = 7 / 6
MSCN_C = 1.0
PRISTINE_FILE = "niqe_pris_params.npz"
PRISTINE_SHA256 = "2a7c182a68c9e7f1b2e2e5ec723279d6f65d912b6fcaf37eb2bf03d7367c4296"
_Y_WEIGHTS = (0.299, 0.587, 0.114)  # YIQ's Y, the weights pyiqa's rgb2yiq uses
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))  # horizontal, vertical and the two diagonal neighbours


# ---------------------------------------------------------------------------------------------- inputs
def _float32_input(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] as the float32 tensor the authors' script fed pyiqa.

    Their script divides float32 8-bit values by 255 on the GPU, where torch multiplies by the float32 reciprocal
    instead, so an 8-bit value k becomes `k · float32(1/255)`, for some k one ulp off the correctly rounded k/255.
    (Inferred, not read: of the variants tried on RealSR only this one reproduces the log.) Inputs that are
    exactly 8-bit levels get that; any other input is rounded to float32.
    """
    rgb = np.asarray(rgb, dtype=np.float64)
    levels = np.round(rgb * 255.0)
    if np.all(np.abs(rgb * 255.0 - levels) < 1e-6):
        return levels.astype(np.float32) * (np.float32(1.0) / np.float32(255.0))
    return rgb.astype(np.float32)


def _fma32(a: np.ndarray, b: np.float32, c: np.ndarray) -> np.ndarray:
    """`a·b + c` rounded once to float32 (a fused multiply-add; the float32 product is exact in float64)."""
    return (a.astype(np.float64) * np.float64(b) + c.astype(np.float64)).astype(np.float32)


def rgb_to_y255(rgb: np.ndarray) -> np.ndarray:
    """YIQ luma of `(..., 3, H, W)` RGB in [0, 1] as rounded grey levels: `(..., H, W)` float64 in [0, 255].

    Computed as pyiqa's `rgb2yiq` ran on the authors' GPU: float32 input (`_float32_input`), the 3-term dot
    product accumulated R, G, B with fused multiply-adds (the order that reproduces the log; plain float32
    sums or the B-first order do not), times 255 in float32, rounded half to even. Y·255 is often a half
    integer up to float32 rounding, and on RealSR NIQE moves by up to 2e-2 when a few such pixels round the
    other way, so each rounding step is reproduced.
    """
    x = _float32_input(rgb)
    w = [np.float32(c) for c in _Y_WEIGHTS]
    r, g, b = x[..., 0, :, :], x[..., 1, :, :], x[..., 2, :, :]
    y = _fma32(b, w[2], _fma32(g, w[1], r * w[0]))
    return np.round(y * np.float32(255.0)).astype(np.float64)  # half to even, like torch.round


@lru_cache(maxsize=1)
def pristine_model() -> tuple[np.ndarray, np.ndarray]:
    """MATLAB's NIQE pristine model: `(mu (36,), cov (36, 36))` float64, from the packaged .npz."""
    with (files("osediff") / "data" / PRISTINE_FILE).open("rb") as f:
        data = np.load(f, allow_pickle=False)
        mu, cov = np.ravel(data["mu_pris_param"]), np.asarray(data["cov_pris_param"])
    if mu.shape != (36,) or cov.shape != (36, 36):
        raise ValueError(f"{PRISTINE_FILE}: expected mu (36,) and cov (36, 36), got {mu.shape}, {cov.shape}")
    return mu.astype(np.float64), cov.astype(np.float64)


# ---------------------------------------------------------------------------------------------- MATLAB helpers
def gaussian_kernel(size: int = WINDOW, sigma: float = WINDOW_SIGMA) -> np.ndarray:
    """MATLAB `fspecial('gaussian', size, sigma)`: `(size, size)` float64 summing to 1.

    Rounded to float32 and back, as pyiqa stores the window before casting it to the image's float64.
    """
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    h = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    h[h < np.finfo(np.float64).eps * h.max()] = 0
    return (h / h.sum()).astype(np.float32).astype(np.float64)


def filter_replicate(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """MATLAB `imfilter(x, kernel, 'replicate')` (correlation, same size) of `(H, W)` float64, odd kernel.

    One shifted multiply-add per tap: the float32-rounded 2-D window is not exactly separable.
    """
    k = kernel.shape[0]
    h, w = x.shape
    padded = np.pad(x, k // 2, mode="edge")
    out = np.zeros_like(x)
    for i in range(k):
        for j in range(k):
            if kernel[i, j]:
                out += kernel[i, j] * padded[i:i + h, j:j + w]
    return out


def mscn(y: np.ndarray, c: float = MSCN_C) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients `(y − μ) / (σ + c)` of `(H, W)` float64 grey levels."""
    kernel = gaussian_kernel()
    mu = filter_replicate(y, kernel)
    second = filter_replicate(y * y, kernel)
    sigma = np.sqrt(np.abs(second - mu * mu) + np.finfo(np.float64).eps)
    return (y - mu) / (sigma + c)


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic with a = −0.5, MATLAB imresize's 'bicubic' kernel."""
    ax = np.abs(x)
    near = (1.5 * ax - 2.5) * ax * ax + 1
    far = ((-0.5 * ax + 2.5) * ax - 4) * ax + 2
    return np.where(ax <= 1, near, np.where(ax <= 2, far, 0.0))


@lru_cache(maxsize=32)
def imresize_taps(in_size: int, out_size: int, antialias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB `imresize(..., 'bicubic')` along one axis: `(index, weight)`, both `(out_size, taps)`, with
    `out[i] = Σ_t weight[i, t] · in[index[i, t]]`.

    Output pixel i samples input position `(i + 0.5)/s − 0.5` (s = out/in); when shrinking with `antialias` the
    kernel is stretched by 1/s; weights are normalised per output pixel, and taps beyond a border read the
    image mirrored symmetrically (edge pixel repeated: ..., b, a | a, b, ...).
    """
    s = out_size / in_size
    stretch = s if antialias and s < 1 else 1.0
    taps = math.ceil(4 / stretch) + 2  # kernel support plus a margin of one tap each side
    centre = (np.arange(out_size) + 0.5) / s - 0.5  # (out,)
    first = np.floor(centre) - taps // 2 + 1
    index = first[:, None] + np.arange(taps)[None, :]  # (out, taps) input positions
    weight = _cubic((centre[:, None] - index) * stretch)
    weight /= weight.sum(axis=1, keepdims=True)
    period = 2 * in_size  # symmetric mirroring: -1 -> 0, -2 -> 1, in_size -> in_size - 1
    j = np.mod(index.astype(np.int64), period)
    return np.where(j >= in_size, period - 1 - j, j), weight


def _resize_axis(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """Resize one axis of `x` in x's dtype, summing the taps as four interleaved partial sums (taps 0, 4, 8, ... |
    1, 5, 9, ... | ...) chained left to right: the order of a GPU sum over pyiqa's tap axis, as we infer from
    the log (a plain left-to-right or a pairwise sum misses it on 2 of 100 images by up to 3e-3: in float32 the
    order decides the last bit, and the last bit can flip NIQE's shape look-ups)."""
    index, weight = imresize_taps(x.shape[axis], out_size)
    x = np.moveaxis(x, axis, 0)  # (in, ...)
    partial = [np.zeros((out_size, *x.shape[1:]), dtype=x.dtype) for _ in range(4)]
    for t in range(index.shape[1]):
        partial[t % 4] += weight[:, t].astype(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) * x[index[:, t]]
    return np.moveaxis(((partial[0] + partial[1]) + partial[2]) + partial[3], 0, axis)


def imresize(x: np.ndarray, scale: float, dtype: type = np.float64) -> np.ndarray:
    """MATLAB `imresize(x, scale, 'bicubic')` (antialiased when shrinking) of `(H, W)` to `ceil(H·scale)` ×
    `ceil(W·scale)`, rows first, computed in `dtype` (NIQE: float32, as pyiqa's port) and returned as float64."""
    h, w = x.shape
    x = _resize_axis(x.astype(dtype), math.ceil(h * scale), 0)
    return _resize_axis(x, math.ceil(w * scale), 1).astype(np.float64)


# ---------------------------------------------------------------------------------------------- features
@lru_cache(maxsize=1)
def _shape_table() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The AGGD shape grid α = 0.2, 0.201, ..., 10 (9801 values, float32-rounded as pyiqa's `torch.arange`),
    the ratio `Γ(2/α)² / (Γ(1/α) Γ(3/α))` on it, and `log Γ(1/α)`, `log Γ(2/α)`, `log Γ(3/α)` per entry."""
    alpha = (0.2 + 0.001 * np.arange(9801)).astype(np.float32).astype(np.float64)
    lg1, lg2, lg3 = (np.array([math.lgamma(k / a) for a in alpha]) for k in (1, 2, 3))
    return alpha, np.exp(2 * lg2 - (lg1 + lg3)), lg1, lg2, lg3


def aggd_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Moment-matching fit of an asymmetric generalised Gaussian to each of N samples.

    Args:
        x: `(N, h, w)` float64 (MSCN coefficients of N blocks, or their neighbour products).
    Returns:
        `(alpha, beta_left, beta_right, mean)`, each `(N,)`: shape, left and right scales and the mean
        `(β_r − β_l) Γ(2/α)/Γ(1/α)`. A block without negative (or positive) values gives NaN scales and mean.
    """
    alpha_grid, ratio, lg1, lg2, lg3 = _shape_table()
    left, right = x < 0, x > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        left_std = np.sqrt(np.where(left, x * x, 0).sum(axis=(1, 2)) / left.sum(axis=(1, 2)))
        right_std = np.sqrt(np.where(right, x * x, 0).sum(axis=(1, 2)) / right.sum(axis=(1, 2)))
        g = left_std / right_std
        r_hat = np.abs(x).mean(axis=(1, 2)) ** 2 / (x * x).mean(axis=(1, 2))
        r_norm = r_hat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    # argmin of a NaN row is 0 (numpy and torch agree): such a block gets α = 0.2 and NaN scales.
    k = np.argmin(np.abs(ratio[None, :] - r_norm[:, None]), axis=1)
    scale = np.sqrt(np.exp(lg1[k] - lg3[k]))
    beta_l, beta_r = left_std * scale, right_std * scale
    return alpha_grid[k], beta_l, beta_r, (beta_r - beta_l) * np.exp(lg2[k] - lg1[k])


def block_features(blocks: np.ndarray) -> np.ndarray:
    """The 18 NIQE features of each MSCN block: `(N, h, w)` -> `(N, 18)` float64.

    Order: α and (β_l + β_r)/2 of the coefficients, then for each neighbour shift (0,1), (1,0), (1,1), (1,−1):
    α, mean, β_l, β_r of the products with the block circularly shifted (within the block).
    """
    alpha, beta_l, beta_r, _ = aggd_fit(blocks)
    feats = [alpha, (beta_l + beta_r) / 2]
    for shift in _SHIFTS:
        alpha, beta_l, beta_r, mean = aggd_fit(blocks * np.roll(blocks, shift, axis=(1, 2)))
        feats += [alpha, mean, beta_l, beta_r]
    return np.stack(feats, axis=1)


def split_blocks(x: np.ndarray, size: int) -> np.ndarray:
    """`(H, W)` with H, W multiples of `size` -> `(H/size · W/size, size, size)` non-overlapping blocks."""
    h, w = x.shape
    return x.reshape(h // size, size, w // size, size).swapaxes(1, 2).reshape(-1, size, size)


def niqe_features(y: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Per-block features of a grey image at two scales: `(H, W)` grey levels in [0, 255] -> `(n_blocks, 36)`.

    Raises ValueError for an image smaller than one block.
    """
    h, w = (y.shape[0] // block) * block, (y.shape[1] // block) * block
    if h == 0 or w == 0:
        raise ValueError(f"NIQE needs an image of at least {block}×{block} pixels, got {y.shape[1]}×{y.shape[0]}")
    y = y[:h, :w]
    fine = block_features(split_blocks(mscn(y), block))
    half = imresize(y / 255.0, 0.5, dtype=np.float32) * 255.0
    coarse = block_features(split_blocks(mscn(half), block // 2))
    return np.concatenate([fine, coarse], axis=1)


def pinv(a: np.ndarray) -> np.ndarray:
    """Moore–Penrose pseudo-inverse by SVD, singular values below `max(m, n)·eps·σ_max` dropped (torch's
    `linalg.pinv` default)."""
    u, s, vt = np.linalg.svd(a)
    keep = s > max(a.shape) * np.finfo(a.dtype).eps * s.max()
    return (vt[keep].T / s[keep]) @ u[:, keep].T


def niqe_distance(features: np.ndarray, mu_p: np.ndarray, cov_p: np.ndarray) -> float:
    """Step 4–5: the distance between the Gaussian fitted to `features` `(n, 36)` and the pristine one."""
    mu = np.nanmean(features, axis=0)
    clean = features[~np.isnan(features).any(axis=1)]
    cov = np.cov(clean, rowvar=False, ddof=1 if len(clean) > 1 else 0)
    d = mu_p - mu
    return float(np.sqrt(d @ pinv((cov_p + cov) / 2) @ d))


def niqe(rgb: np.ndarray) -> float | np.ndarray:
    """NIQE of RGB images with the authors' protocol (spec §5.1; pyiqa 0.1.10 `niqe`). Lower is better.

    Args:
        rgb: `(..., 3, H, W)` float RGB in [0, 1], H and W >= 96.
    Returns:
        a float for one `(3, H, W)` image, else a float64 array of shape `(...)`.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim < 3 or rgb.shape[-3] != 3:
        raise ValueError(f"expected RGB images (..., 3, H, W), got shape {rgb.shape}")
    if not np.all(np.isfinite(rgb)) or (rgb.size and (rgb.min() < 0 or rgb.max() > 1)):
        raise ValueError("NIQE expects finite RGB floats in [0, 1], not 0..255")
    mu_p, cov_p = pristine_model()
    y = rgb_to_y255(rgb)
    values = np.array([niqe_distance(niqe_features(im), mu_p, cov_p)
                       for im in y.reshape(-1, *y.shape[-2:])]).reshape(y.shape[:-2])
    return float(values) if rgb.ndim == 3 else values
