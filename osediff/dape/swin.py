"""The Swin Transformer image encoder of RAM/DAPE (Liu et al., ICCV 2021, arXiv 2103.14030; spec Appendix B).

Swin-L at 384: 4x4 patches embedded to 192 channels, four stages of depths (2, 2, 18, 2) at 96², 48², 24², 12²
tokens, each stage but the last ending in a 2x2 patch merging that halves the resolution and doubles the width.
Blocks alternate plain and shifted 12x12 windows of multi-head self-attention with a learned relative position
bias. The encoder returns `cat([mean over tokens, tokens])`: (B, 1 + 144, 1536).

Parameter names follow the published Swin/RAM checkpoints (`patch_embed.proj`, `layers.{i}.blocks.{j}.attn.qkv`,
`layers.{i}.downsample.reduction`, ...), so `ram_swin_large_14m.pth` loads without renaming. The two derived
constants that the original stores as buffers (`relative_position_index`, `attn_mask`) are not module state here:
they depend only on the geometry, so they come from cached pure functions and the state dict holds weights only.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

# What the reference adds to the attention logits of token pairs that a shifted window must keep apart. Not -inf:
# exp(-100) underflows in every dtype used here, and -100 is what the trained weights were used with.
MASK_VALUE = -100.0


@functools.lru_cache(maxsize=64)
def relative_position_index(window: int, device: torch.device) -> Tensor:
    """(N, N) row of the (2w-1)² bias table for each (query, key) pair of a w x w window, N = w².

    The table is indexed by the offset (dy, dx) between the two tokens, each in [-(w-1), w-1], flattened
    row-major: (dy + w - 1) * (2w - 1) + (dx + w - 1).
    """
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    dy = ys.flatten()[:, None] - ys.flatten()[None, :]
    dx = xs.flatten()[:, None] - xs.flatten()[None, :]
    return ((dy + window - 1) * (2 * window - 1) + (dx + window - 1)).to(device)


@functools.lru_cache(maxsize=64)
def shifted_window_mask(resolution: int, window: int, shift: int, device: torch.device) -> Tensor:
    """(nW, N, N) additive float32 mask for shifted-window attention on a resolution² map.

    The map is rolled by -shift before windowing, so the last row and column of windows hold tokens from
    opposite edges of the image. Along each axis the rolled map has three bands, [0, R-w), [R-w, R-s) and
    [R-s, R); two tokens may attend to each other only if they lie in the same band on both axes.
    """
    pos = torch.arange(resolution)
    band = (pos >= resolution - window).long() + (pos >= resolution - shift).long()  # (R,) in {0, 1, 2}
    region = (band[:, None] * 3 + band[None, :]).float()  # (R, R), one id per (row band, column band)
    region = window_partition(region[None, :, :, None], window)[0, :, :, 0]  # (nW, N)
    apart = region[:, :, None] != region[:, None, :]
    return torch.zeros(apart.shape).masked_fill(apart, MASK_VALUE).to(device)


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) -> (B, nW, w*w, C), windows in row-major order, tokens row-major inside each window."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).transpose(2, 3)
    return x.reshape(B, (H // window) * (W // window), window * window, C)


def window_merge(windows: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `window_partition`: (B, nW, w*w, C) -> (B, H, W, C)."""
    B, _, N, C = windows.shape
    window = round(N**0.5)
    x = windows.view(B, height // window, width // window, window, window, C).transpose(2, 3)
    return x.reshape(B, height, width, C)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, plus a learned bias per head and relative offset."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.qkv = nn.Linear(dim, 3 * dim)  # output rows: [q; k; v], each split into heads
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, nW, N, C) windows; mask: (nW, N, N) additive, or None. Returns (B, nW, N, C)."""
        B, nW, N, C = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(B, nW, N, 3, h, C // h).permute(3, 0, 1, 4, 2, 5)  # each (B, nW, h, N, hd)
        bias = self.relative_position_bias_table[relative_position_index(self.window, x.device)]  # (N, N, h)
        # Written out (not SDPA) so fp16 rounds as the reference does: scale q, q·kᵀ, + bias, + mask, softmax.
        attn = (q * (C // h) ** -0.5) @ k.transpose(-2, -1) + bias.permute(2, 0, 1).to(q.dtype)  # (B, nW, h, N, N)
        if mask is not None:
            attn = attn + mask[:, None].to(q.dtype)
        out = attn.softmax(-1) @ v  # (B, nW, h, N, hd)
        out = out.transpose(2, 3).reshape(B, nW, N, C)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention and MLP, each with a residual connection."""

    def __init__(self, dim: int, num_heads: int, resolution: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        if resolution <= window:  # as the reference: the whole map is one window, and nothing to shift
            window, shift = resolution, 0
        if resolution % window:
            raise ValueError(f"Swin: a {resolution}² token map does not split into {window}² windows")
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:  # (B, R*R, C) -> (B, R*R, C)
        B, L, C = x.shape
        R, w, s = self.resolution, self.window, self.shift
        y = self.norm1(x).view(B, R, R, C)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        mask = shifted_window_mask(R, w, s, x.device) if s else None
        y = window_merge(self.attn(window_partition(y, w), mask), R, R)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y.reshape(B, L, C)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated, normalised and projected: (B, R², C) -> (B, (R/2)², 2C)."""

    def __init__(self, dim: int, resolution: int):
        super().__init__()
        if resolution % 2:
            raise ValueError(f"Swin: cannot merge 2x2 patches of a {resolution}² token map")
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, _, C = x.shape
        r = self.resolution // 2
        # The published weights expect the neighbours in the order (dy, dx) = (0,0), (1,0), (0,1), (1,1):
        # dx is the slow index, so put it before dy.
        x = x.view(B, r, 2, r, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, r * r, 4 * C)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, resolution: int, window: int, mlp_ratio: float,
                 downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, resolution, window, shift=0 if j % 2 == 0 else window // 2,
                      mlp_ratio=mlp_ratio)
            for j in range(depth))
        self.downsample = PatchMerging(dim, resolution) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, S, S) -> (B, (S/p)², C)
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinTransformer(nn.Module):
    """Swin encoder without classification head; `forward` returns (B, 1 + L, C) = [mean token; tokens].

    Defaults are RAM's Swin-L at 384 (`ram/configs/swin/config_swinL_384.json`): no absolute position
    embedding, patch norm on, qkv bias on, stochastic depth inactive at inference.
    """

    def __init__(self, image_size: int = 384, patch_size: int = 4, embed_dim: int = 192,
                 depths: tuple[int, ...] = (2, 2, 18, 2), num_heads: tuple[int, ...] = (6, 12, 24, 48),
                 window_size: int = 12, mlp_ratio: float = 4.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"Swin: image size {image_size} is not a multiple of the patch size {patch_size}")
        self.image_size = image_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        resolution = image_size // patch_size
        n = len(depths)
        self.layers = nn.ModuleList(
            SwinStage(embed_dim * 2**i, depths[i], num_heads[i], resolution // 2**i, window_size, mlp_ratio,
                      downsample=i < n - 1)
            for i in range(n))
        self.num_features = embed_dim * 2 ** (n - 1)
        self.norm = nn.LayerNorm(self.num_features)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 3, S, S) ImageNet-normalised, S = image_size. Returns (B, 1 + L, num_features)."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"Swin expects {self.image_size}x{self.image_size} inputs, got {tuple(x.shape)}")
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        x = self.norm(x)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
