"""PSNR and SSIM exactly as the authors measured them (spec §5.1: pyiqa 0.1.10 with `test_y_channel=True`,
`color_space='ycbcr'`), as pure numpy functions: no pyiqa, no torch, no GPU.

Both metrics look at the luma (Y) of BT.601 YCbCr only, over the whole image (no border crop):

- PSNR: Y in [0, 1] as floats (not rounded), data range 1, `10·log10(1 / (MSE + 1e-8))`. The `1e-8` is
  pyiqa's eps, so identical images give 80 dB rather than infinity.
- SSIM: Y scaled to [0, 255] and rounded to integers (as MATLAB's uint8 images), then float64; an 11×11
  Gaussian window with σ = 1.5 applied with 'valid' filtering (no padding, so a 512×512 image gives a
  502×502 map); C1 = (0.01·255)², C2 = (0.03·255)²; the contrast-structure term clamped at 0 (pyiqa's ReLU)
  before it multiplies the luminance term; the map's plain mean. No downsampling.

Inputs are RGB images `(..., 3, H, W)` float in [0, 1] (numpy arrays, or CPU torch tensors, which numpy
reads without a copy); leading axes are batch axes. On the 100 RealSR images these functions reproduce the
authors' per-image log to about 4e-6 (tests/test_metrics.py).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

EPS = 1e-8  # pyiqa's PSNR eps: PSNR = 10·log10(1 / (MSE + EPS)), at most 80 dB
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = (0.01 * 255) ** 2
SSIM_C2 = (0.03 * 255) ** 2

# BT.601 RGB -> Y with RGB in [0, 1] and Y in [16/255, 235/255] (spec §5.1).
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """Luma of BT.601 YCbCr, `Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255`, not rounded.

    Args:
        rgb: `(..., 3, H, W)` RGB in [0, 1].
    Returns:
        `(..., H, W)` float64 Y in [16/255, 235/255].
    """
    rgb = np.asarray(rgb, dtype=np.float64)
    r, g, b = rgb[..., 0, :, :], rgb[..., 1, :, :], rgb[..., 2, :, :]
    return (_Y_OFFSET + _Y_WEIGHTS[0] * r + _Y_WEIGHTS[1] * g + _Y_WEIGHTS[2] * b) / 255.0


def _y_uint8(rgb: np.ndarray) -> np.ndarray:
    """Y scaled to [0, 255] and rounded, as float64: SSIM's input (spec §5.1). `(..., 3, H, W)` -> `(..., H, W)`.

    The conversion runs in float32, as pyiqa's does (its input tensors are float32), so that the rare pixel
    whose Y·255 falls within float32 rounding of a half integer rounds the same way as in the authors' log.
    """
    rgb = np.moveaxis(np.asarray(rgb, dtype=np.float32), -3, -1)  # (..., H, W, 3)
    y = (rgb @ np.asarray(_Y_WEIGHTS, dtype=np.float32) + np.float32(_Y_OFFSET)) / np.float32(255.0)
    return np.round(y * np.float32(255.0)).astype(np.float64)  # round half to even, like torch.round


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """1-D Gaussian taps `(size,)`, float64, summing to 1; SSIM's 2-D window is their outer product."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of the last two axes: `(..., H, W)` -> `(..., H-k+1, W-k+1)`."""
    k = taps.shape[0]
    x = sliding_window_view(x, k, axis=-2) @ taps  # (..., H-k+1, W)
    return sliding_window_view(x, k, axis=-1) @ taps  # (..., H-k+1, W-k+1)


def _check_pair(sr: np.ndarray, hr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sr, hr = np.asarray(sr), np.asarray(hr)
    if sr.shape != hr.shape:
        raise ValueError(f"SR and HR shapes differ: {sr.shape} vs {hr.shape}")
    if sr.ndim < 3 or sr.shape[-3] != 3:
        raise ValueError(f"expected RGB images (..., 3, H, W), got shape {sr.shape}")
    for name, x in (("SR", sr), ("HR", hr)):
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} image holds NaN or infinite values")
        if x.size and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"{name} image is outside [0, 1] (min {x.min():g}, max {x.max():g}): "
                             "pass RGB floats in [0, 1], not 0..255")
    return sr, hr


def _scalar_if_single(values: np.ndarray, ndim: int) -> float | np.ndarray:
    return float(values) if ndim == 3 else values


def psnr(sr: np.ndarray, hr: np.ndarray) -> float | np.ndarray:
    """PSNR in dB on BT.601 Y, data range 1, eps 1e-8, no border crop (spec §5.1; pyiqa 0.1.10 `psnr`).

    Args:
        sr, hr: `(..., 3, H, W)` RGB in [0, 1], same shape.
    Returns:
        a float for one `(3, H, W)` image, else a float64 array of shape `(...)`. Identical images give 80.
    """
    sr, hr = _check_pair(sr, hr)
    mse = np.mean((rgb_to_y(sr) - rgb_to_y(hr)) ** 2, axis=(-2, -1))
    return _scalar_if_single(10 * np.log10(1.0 / (mse + EPS)), sr.ndim)


def ssim_map(y_sr: np.ndarray, y_hr: np.ndarray) -> np.ndarray:
    """SSIM map of two luma images in [0, 255], pyiqa 0.1.10's variant (spec §5.1).

    Args:
        y_sr, y_hr: `(..., H, W)` float64 luma in [0, 255] (rounded, for the authors' protocol), H, W >= 11.
    Returns:
        `(..., H-10, W-10)` map: luminance term × max(contrast-structure term, 0). Never NaN: C1, C2 > 0
        keep both denominators positive, so constant images are fine.
    """
    if min(y_sr.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}×{SSIM_WINDOW}, got {y_sr.shape[-2:]}")
    # The five local moments in one filtering pass: (..., 5, H, W) -> (..., 5, H-10, W-10).
    moments = np.stack([y_sr, y_hr, y_sr * y_sr, y_hr * y_hr, y_sr * y_hr], axis=-3)
    mu1, mu2, e11, e22, e12 = np.moveaxis(_filter_valid(moments, gaussian_window()), -3, 0)
    var1, var2, cov = e11 - mu1 * mu1, e22 - mu2 * mu2, e12 - mu1 * mu2
    cs = np.maximum((2 * cov + SSIM_C2) / (var1 + var2 + SSIM_C2), 0.0)  # pyiqa's ReLU on the cs map
    luminance = (2 * mu1 * mu2 + SSIM_C1) / (mu1 * mu1 + mu2 * mu2 + SSIM_C1)
    return luminance * cs


def ssim(sr: np.ndarray, hr: np.ndarray) -> float | np.ndarray:
    """SSIM on rounded BT.601 Y in [0, 255], float64, 'valid' 11×11 Gaussian σ 1.5 (spec §5.1; pyiqa 0.1.10).

    Args:
        sr, hr: `(..., 3, H, W)` RGB in [0, 1], same shape, H, W >= 11.
    Returns:
        a float for one `(3, H, W)` image, else a float64 array of shape `(...)`. In [0, 1]; identical
        images give 1.
    """
    sr, hr = _check_pair(sr, hr)
    return _scalar_if_single(ssim_map(_y_uint8(sr), _y_uint8(hr)).mean(axis=(-2, -1)), sr.ndim)
