"""Run-time options of the SR pipeline and of file runs, kept free of torch so `osediff sr --help` starts
instantly; `osediff sr` derives its flags from these fields."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from osediff.core.precision import DTYPE_CHOICES  # noqa: F401  (values of `--dtype`, resolved in precision.py)

DEFAULT_MAX_INPUT_MEGAPIXELS = 150.0  # = osediff.files.images.DEFAULT_MAX_INPUT_MEGAPIXELS (a test checks)


@dataclass(frozen=True)
class SROptions:
    """Run-time options of the pipeline; `osediff sr` derives its flags from these fields.

    The output size: `size` (W, H) if given, else the long side `long_side` with the aspect kept, else
    round(scale·W) × round(scale·H) (`osediff.core.resample.output_size`). `size` may be given as "WxH".
    """

    scale: float = 4
    long_side: int | None = None
    size: str | tuple[int, int] | None = None
    process_size: int = 512
    max_guard_megapixels: float = 4.0
    color_fix: Literal["adain", "wavelet", "none", "nofix"] = "adain"  # "nofix" = the reference's name for none
    prompt: str = ""
    tile: int = 96
    tile_overlap: int = 32
    tile_batch: int = 1  # >1 is faster on GPUs, but batched kernels round differently from the reference
    vae_encoder_tile: int = 1024
    vae_decoder_tile: int = 224
    vae_offload: bool = False
    max_memory: float | None = None  # GiB: device memory (GPU) or process RSS (CPU/MPS); None = auto, 0 = no limit
    spill_dir: str | None = None  # where tile states and idle weights spill (default: the temp folder; CLI: OUTDIR)
    sample_latent: bool = False
    seed: int | None = None

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")
        if isinstance(self.scale, float) and self.scale.is_integer():
            object.__setattr__(self, "scale", int(self.scale))  # 4.0 is 4: the integer (bit-exact) path
        if isinstance(self.size, str):
            m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", self.size)
            if not m:
                raise ValueError(f"--size must be WxH (e.g. 3840x2160), got {self.size!r}")
            object.__setattr__(self, "size", (int(m[1]), int(m[2])))
        if self.size is not None:
            object.__setattr__(self, "size", tuple(int(v) for v in self.size))
            if len(self.size) != 2 or min(self.size) < 1:
                raise ValueError(f"--size must be two positive numbers, got {self.size}")
            if self.long_side is not None:
                raise ValueError("give --size or --long-side, not both")
        if self.long_side is not None and self.long_side < 1:
            raise ValueError(f"--long-side must be positive, got {self.long_side}")
        if self.max_guard_megapixels < 0:
            raise ValueError("--max-guard-megapixels must be >= 0 (0 = no cap)")
        if not 0 <= self.tile_overlap < self.tile:
            raise ValueError(f"--tile-overlap ({self.tile_overlap}) must be >= 0 and below --tile ({self.tile})")
        if self.max_memory is not None and self.max_memory < 0:
            raise ValueError(f"--max-memory must be >= 0 GiB (0 = no limit), got {self.max_memory}")
        if min(self.tile, self.vae_encoder_tile, self.vae_decoder_tile, self.tile_batch, self.process_size) < 1:
            raise ValueError("tile sizes, tile_batch and process_size must be positive")


@dataclass(frozen=True)
class FileOptions:
    """How `osediff sr` reads and writes files (`osediff.core.batch.run_batch`)."""

    max_input_megapixels: float = DEFAULT_MAX_INPUT_MEGAPIXELS  # 0 = no limit
    strip_metadata: bool = False
    keep_rgb: bool = False

    def __post_init__(self):
        if self.max_input_megapixels < 0:
            raise ValueError("--max-input-megapixels must be >= 0 (0 = no limit)")
