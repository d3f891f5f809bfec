"""Run-time options of the SR pipeline, kept free of torch so `osediff sr --help` starts instantly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from osediff.core.precision import DTYPE_CHOICES  # noqa: F401  (values of `--dtype`, resolved in precision.py)


@dataclass(frozen=True)
class SROptions:
    """Run-time options of the pipeline; `osediff sr` derives its flags from these fields."""

    scale: int = 4
    process_size: int = 512
    color_fix: Literal["adain", "wavelet", "none", "nofix"] = "adain"  # "nofix" = the reference's name for none
    prompt: str = ""
    tile: int = 96
    tile_overlap: int = 32
    tile_batch: int = 1  # >1 is faster on GPUs, but batched kernels round differently from the reference
    vae_encoder_tile: int = 1024
    vae_decoder_tile: int = 224
    vae_offload: bool = False
    sample_latent: bool = False
    seed: int | None = None

    def __post_init__(self):
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")
        if not 0 <= self.tile_overlap < self.tile:
            raise ValueError(f"--tile-overlap ({self.tile_overlap}) must be >= 0 and below --tile ({self.tile})")
        if min(self.tile, self.vae_encoder_tile, self.vae_decoder_tile, self.tile_batch, self.process_size) < 1:
            raise ValueError("tile sizes, tile_batch and process_size must be positive")
