"""Where tile states wait between sync points: the compute device, a host-memory tier, or files on disk.

The lockstep driver (`osediff.tiling.lockstep.run_lockstep`) asks the store to `fetch` a tile batch's state
before running it to its next sync point and to `park` it afterwards. A state is moved, never changed: the
bytes that come back from host memory or from a spill file are the bytes that went in, with the same shape,
strides and dtype, so where a state waited cannot change any result (the arithmetic per tile is untouched).

Tiers are filled in order up to their quota (bytes); what does not fit goes to a `SpillFolder`. The folder is
created on the first spill only, and `SpillFolder.close` removes it (the caller does so in a `finally`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclass
class SpilledTensor:
    """A tensor written to one file: enough to rebuild it exactly (shape, strides, dtype)."""

    path: Path
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


class SpillFolder:
    """A private folder of spilled tensors under `parent`, made on first use, removed by `close`.
    `written` counts the bytes written (the spill volume of a run)."""

    def __init__(self, parent: str | os.PathLike):
        self.parent = Path(parent)
        self.folder: Path | None = None
        self._made_parent = False
        self._count = 0
        self.written = 0
        self.seconds = 0.0  # spent writing and reading (the cost of spilling, beside the compute)

    def _dir(self) -> Path:
        if self.folder is None:
            self._made_parent = not self.parent.exists()
            self.parent.mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix="run-", dir=self.parent))
        return self.folder

    def write(self, t: torch.Tensor) -> SpilledTensor:
        """Write t's elements (row-major) to a new file; t itself is left as it is."""
        t0 = time.perf_counter()
        path = self._dir() / f"{self._count}.bin"
        self._count += 1
        flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        with open(path, "wb") as f:
            f.write(memoryview(flat.numpy()))
        self.written += flat.numel()
        self.seconds += time.perf_counter() - t0
        return SpilledTensor(path, tuple(t.shape), tuple(t.stride()), t.dtype)

    def read(self, s: SpilledTensor, device: torch.device | str) -> torch.Tensor:
        """The tensor written as `s`, on `device`, with its original strides; the file is deleted."""
        t0 = time.perf_counter()
        out = torch.empty(s.shape, dtype=s.dtype)
        with open(s.path, "rb") as f:
            got = f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
        if got != out.numel() * out.element_size():
            raise OSError(f"spill file {s.path} is short ({got} bytes)")
        s.path.unlink()
        if out.stride() != s.stride:  # e.g. channels-last: other strides select other kernels (other rounding)
            out = torch.empty_strided(s.shape, s.stride, dtype=s.dtype).copy_(out)
        self.seconds += time.perf_counter() - t0
        return out.to(device)

    def close(self) -> None:
        """Remove the run's folder, and `parent` too when this object created it and it is empty."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        if self._made_parent:
            try:
                self.parent.rmdir()
            except OSError:
                pass  # someone else's files are there


@dataclass
class Tier:
    """A place states may wait: `device` None = stay where they were computed; `quota` bytes at most."""

    device: torch.device | str | None
    quota: float
    used: int = 0


@dataclass
class TileStore:
    """Placement of tile states between sync points (see the module docstring).

    `tiers` are tried in order; a state that fits none goes to `spill` (which must then be given).
    `pressure()` (optional) returns how many bytes the run is over its limit right now; before a tile runs,
    resident states are spilled until it is <= 0 or none is left (a guard against estimates that were low).
    """

    device: torch.device | str
    tiers: list[Tier]
    spill: SpillFolder | None = None
    pressure: Callable[[], int] | None = None
    out_device: torch.device | str | None = None  # where the stitched result is assembled (None: compute device)
    on_spill: Callable[[], None] | None = None  # called before the first state goes to disk (a log line)
    _where: dict = field(default_factory=dict)  # id(tile) -> (tier index, bytes) or ("disk", files)
    _resident: dict = field(default_factory=dict)  # id(tile) -> tile, for tiles parked in a tier

    def fetch(self, t) -> None:
        """Bring t.h / t.skip to the compute device."""
        self._relieve(keep=t)
        where = self._where.pop(id(t), None)
        if where is None:
            return
        if where[0] == "disk":
            h, skip, same = where[1]
            t.h = None if h is None else self.spill.read(h, self.device)
            t.skip = t.h if same else (None if skip is None else self.spill.read(skip, self.device))
            return
        i, size = where
        self.tiers[i].used -= size
        self._resident.pop(id(t), None)
        if self.tiers[i].device is not None:
            _move(t, self.device)

    def park(self, t) -> None:
        """Put t's state where it fits (a tier with room, else disk)."""
        size = nbytes(t.h) + (0 if t.skip is t.h else nbytes(t.skip))
        for i, tier in enumerate(self.tiers):
            if tier.used + size <= tier.quota:
                tier.used += size
                if tier.device is not None:
                    _move(t, tier.device)
                self._where[id(t)] = (i, size)
                self._resident[id(t)] = t
                return
        self._to_disk(t)

    def drop(self, t) -> None:
        """Forget a finished tile (its state is already None)."""
        self._where.pop(id(t), None)
        self._resident.pop(id(t), None)

    def _to_disk(self, t) -> None:
        if self.spill is None:
            raise RuntimeError("tile states exceed the memory quota and no spill folder was given")
        if self.on_spill is not None:
            self.on_spill()
            self.on_spill = None
        same = t.skip is t.h
        h = None if t.h is None else self.spill.write(t.h)
        skip = None if same or t.skip is None else self.spill.write(t.skip)
        t.h = t.skip = None
        self._where[id(t)] = ("disk", (h, skip, same))

    def _relieve(self, keep) -> None:
        """Spill states resident on the compute device (latest parked first) while `pressure()` says the run is
        over its limit (states in a host tier do not count against the device)."""
        if self.pressure is None or self.spill is None:
            return
        while self.pressure() > 0:
            tid = next((k for k in reversed(self._resident) if self._resident[k] is not keep
                        and self.tiers[self._where[k][0]].device is None), None)
            if tid is None:
                break
            tile = self._resident[tid]
            i, size = self._where[tid]
            self.tiers[i].used -= size
            del self._resident[tid]
            self._to_disk(tile)


def _move(t, device) -> None:
    # Asynchronous both ways: CUDA -> CPU lands in pinned memory, and the copy back is stream-ordered.
    same = t.skip is t.h
    t.h = None if t.h is None else t.h.to(device, non_blocking=True)
    t.skip = t.h if same else (None if t.skip is None else t.skip.to(device, non_blocking=True))


def offload_store(device: torch.device | str, offload: torch.device | str | None) -> TileStore:
    """The store of the old `offload` argument: every state waits on `offload` (None: on the compute device)."""
    return TileStore(device, [Tier(offload, float("inf"))], out_device=offload)
