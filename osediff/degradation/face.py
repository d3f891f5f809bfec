"""Face-variant degradation (spec §4.7; the reference's `dataloaders/facesr_dataset.py`, CodeFormer-style).

    blur (41×41 iso/aniso Gaussian, σ ~ U[1, 15] per axis, θ ~ U[-π, π])
    -> bilinear downsample by s ~ U[1, 30] to (int(W // s), int(H // s))
    -> colour Gaussian noise σ ~ U[0, 20] / 255, clip
    -> JPEG at quality int(U[30, 100])
    -> bilinear resize back to (H, W)

The reference runs these steps with OpenCV on one float32 BGR image; here they run in torch on a batch, with
PIL for the JPEG. Where the numbers can differ from cv2 (measured against OpenCV 5.0 on float32 512² images):
- blur: `cv2.filter2D` with this large kernel filters in the DFT domain, here a direct convolution; both use
  reflect-101 borders, so results agree to float rounding (max 2e-6);
- resize: `cv2.INTER_LINEAR` and `F.interpolate(bilinear, align_corners=False, antialias=False)` use the same
  half-pixel sampling and edge clamping on float images (no antialiasing in either): max 4e-6;
- JPEG: cv2 and PIL both call libjpeg with `jpeg_set_quality(q, force_baseline)`, 4:2:0 and the islow DCT,
  and both round the input to 8 bits first: bit-identical in that measurement, and off by at most ±1 level at
  a few pixels where the two link different libjpeg builds. The image goes to the CPU for this step.

Like the reference, the result is not quantised (the bilinear resize back leaves it off the 8-bit grid).
Left to the dataset: the LANCZOS resize to 512×512 and the flips/transposition (`augment(hflip, rotation)`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from osediff.degradation.realesrgan import (
    add_gaussian_noise,
    blur,
    config_from_mapping,
    read_yaml,
    resize,
    sample_mixed_kernels,
    uniform,
)


@dataclass(frozen=True)
class FaceDegradationConfig:
    """`params_codeformer.yml` as a frozen dataclass (same keys); defaults are the shipped file (spec §4.7)."""

    blur_kernel_size: int = 41
    kernel_list: tuple[str, ...] = ("iso", "aniso")
    kernel_prob: tuple[float, ...] = (0.5, 0.5)
    blur_sigma: tuple[float, float] = (1.0, 15.0)
    downsample_range: tuple[float, float] = (1.0, 30.0)
    noise_range: tuple[float, float] = (0.0, 20.0)
    jpeg_range: tuple[float, float] = (30.0, 100.0)

    def __post_init__(self) -> None:
        if self.blur_kernel_size % 2 != 1:
            raise ValueError(f"blur_kernel_size must be odd, got {self.blur_kernel_size}")
        if unknown := set(self.kernel_list) - {"iso", "aniso"}:
            raise ValueError(f"face kernel_list supports iso/aniso only, got {sorted(unknown)}")
        if len(self.kernel_prob) != len(self.kernel_list) or \
                not math.isclose(sum(self.kernel_prob), 1, abs_tol=1e-6):
            raise ValueError("kernel_prob must give one probability per kernel type, summing to 1")
        if self.downsample_range[0] < 1:
            raise ValueError("downsample_range must start at >= 1")

    @classmethod
    def from_yaml(cls, path: str | Path | None = None) -> FaceDegradationConfig:
        """Read a `params_codeformer.yml`-style file (default: the one shipped in `osediff/data`)."""
        return config_from_mapping(cls, read_yaml(path, "params_codeformer.yml"))


def pil_jpeg(x: Tensor, quality: int) -> Tensor:
    """JPEG round trip through PIL/libjpeg (4:2:0): (1, 3, h, w) in [0, 1] -> same, on x's device and dtype."""
    from PIL import Image

    arr = (x[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality), subsampling="4:2:0")
    buf.seek(0)
    out = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(out).permute(2, 0, 1)[None].to(x)


@torch.no_grad()
def degrade_face(hq: Tensor, cfg: FaceDegradationConfig, generator: torch.Generator) -> Tensor:
    """Face degradation of a batch (spec §4.7 steps 4–8).

    hq: (B, 3, H, W) float in [0, 1] (the reference uses 512×512). Returns (B, 3, H, W) in [0, 1], hq's dtype,
    not quantised. Every random choice is per sample and comes from `generator`.
    """
    if hq.ndim != 4 or hq.shape[1] != 3 or not hq.is_floating_point():
        raise ValueError(f"expected a float (B, 3, H, W) tensor, got {tuple(hq.shape)} {hq.dtype}")
    b, _, h, w = hq.shape
    if min(h, w) <= cfg.blur_kernel_size // 2:
        raise ValueError(f"image {h}x{w} is too small for a {cfg.blur_kernel_size}-tap reflect-padded blur")
    if hq.numel() and (hq.min() < 0 or hq.max() > 1):
        raise ValueError("expected values in [0, 1]")

    # per-sample draws, in a fixed order
    _, kernel = sample_mixed_kernels(generator, b, cfg.blur_kernel_size, cfg.kernel_list, cfg.kernel_prob,
                                     cfg.blur_sigma)
    scale = uniform(generator, b, *cfg.downsample_range)
    sigma = uniform(generator, b, *cfg.noise_range)
    quality = uniform(generator, b, *cfg.jpeg_range).floor().long()  # int(U[30, 100])

    x = blur(hq.float(), kernel.float())
    out = []
    for i in range(b):
        size = (max(1, int(h // float(scale[i]))), max(1, int(w // float(scale[i]))))
        xi = resize(x[i:i + 1], "bilinear", size=size)
        xi = add_gaussian_noise(xi, sigma[i:i + 1], torch.zeros(1, dtype=torch.bool), generator)
        xi = pil_jpeg(xi, int(quality[i]))
        out.append(resize(xi, "bilinear", size=(h, w)))
    return torch.cat(out).to(hq.dtype)
