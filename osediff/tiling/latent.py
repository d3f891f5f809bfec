"""Latent tiling of the single UNet call for large images (spec §1.7), as pure functions plus one driver.

Same grid and Gaussian blending weights as the reference, including its asymmetric midpoints, with two
changes: several tiles go through the UNet per call (`tile_batch`), and the grid terminates for every shape
(the reference loops forever when min(h, w) <= overlap, spec §8.8b; there we use rectangular tiles that span
the narrow side).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

_VAR = 0.01  # variance of the blending Gaussian in tile-relative units (spec §1.7)


def gaussian_weights(tile_w: int, tile_h: int) -> torch.Tensor:
    """(tile_h, tile_w) float64 blending weights: outer(y, x) with x centred at (w−1)/2 and y at h/2 (spec §1.7)."""
    norm = math.sqrt(2 * math.pi * _VAR)
    xs = torch.arange(tile_w, dtype=torch.float64)
    ys = torch.arange(tile_h, dtype=torch.float64)
    x = torch.exp(-((xs - (tile_w - 1) / 2) ** 2) / tile_w**2 / (2 * _VAR)) / norm
    y = torch.exp(-((ys - tile_h / 2) ** 2) / tile_h**2 / (2 * _VAR)) / norm
    return torch.outer(y, x)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: r·(tile−overlap), the last one flush with the end (spec §1.7 steps 2–3)."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"tile ({tile}) must be larger than the overlap ({overlap})")
    n = 1 + math.ceil((size - tile) / stride)  # smallest n with (n−1)·stride + tile ≥ size
    return [r * stride for r in range(n - 1)] + [size - tile]


def tile_grid(h: int, w: int, tile: int, overlap: int) -> tuple[int, int, list[tuple[int, int]]]:
    """Tile height, tile width and the (y, x) origins covering an (h, w) latent; one tile when h·w ≤ tile².

    The reference tiles by area and uses square tiles of side min(tile, h, w). When that side is ≤ overlap it
    never terminates; we then let the tile span the whole narrow side and keep `tile` along the long one.
    """
    if h * w <= tile * tile:
        return h, w, [(0, 0)]
    side = min(tile, h, w)
    th, tw = (side, side) if side > overlap else (min(h, tile), min(w, tile))
    # x-outer, as the reference walks them: the fp32 sums round in this order
    return th, tw, [(y, x) for x in tile_starts(w, tw, overlap) for y in tile_starts(h, th, overlap)]


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int, overlap: int,
                tile_batch: int = 1, on_tile: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Apply `fn` ((N,C,th,tw) -> (N,C,th,tw)) over a Gaussian-blended tile grid of z (B,C,h,w); returns fp32.

    Untiled (a single direct call, cast to fp32) when h·w ≤ tile². Products with the float64 weights are
    added into fp32 buffers, tile by tile in the reference's order, so the result rounds as the reference's.
    `tile_batch` tiles are concatenated along the batch axis per call of `fn`. `on_tile(done, total)` is called
    before each call of `fn`, with the number of tiles done so far and the total (progress reports).
    """
    b, _, h, w = z.shape
    th, tw, origins = tile_grid(h, w, tile, overlap)
    if len(origins) == 1 and (th, tw) == (h, w):
        if on_tile is not None:
            on_tile(0, 1)
        return fn(z).float()
    # float64 like the reference's products (MPS has no float64: float32 there)
    weight = gaussian_weights(tw, th).to(z.device, torch.float32 if z.device.type == "mps" else torch.float64)
    num = torch.zeros(z.shape, dtype=torch.float32, device=z.device)
    den = torch.zeros((1, 1, h, w), dtype=torch.float32, device=z.device)
    for i in range(0, len(origins), tile_batch):
        chunk = origins[i:i + tile_batch]
        if on_tile is not None:
            on_tile(i, len(origins))
        out = fn(torch.cat([z[:, :, y:y + th, x:x + tw] for y, x in chunk]))
        for k, (y, x) in enumerate(chunk):
            num[:, :, y:y + th, x:x + tw] += out[k * b:(k + 1) * b] * weight
            den[:, :, y:y + th, x:x + tw] += weight
    return num / den
