"""`--max-memory`: the most one run may use, and how a run stays within it without changing a single bit.

The limit is device memory on a GPU and the whole process's resident memory (RSS) on a CPU or MPS. Within
it, nothing about the arithmetic changes (same tiles, same tile batches, same kernels); only where things wait
does. Before each VAE stage (`MemorySession.vae_store`):

 1. what the stage needs is estimated from the sizes (`osediff.tiling.vae.VaeCost`): one tile batch's
    working memory (RESERVE × its largest activation) plus every tile's state between sync points;
 2. if that does not fit beside what is in use now, the weights idle in this stage (the UNet, the text
    encoder) are parked: on a GPU in host memory, on a CPU in the spill folder (exact bytes, read back
    before the UNet runs);
 3. tile states fill what is left (the device; on a GPU then host memory), the rest is spilled to files in
    the spill folder (`osediff.tiling.store`), and a guard spills more if the process grows past the limit.
A limit too small for one tile batch (beside the weights the stage needs) fails at once with the numbers,
as does a spill folder on a disk without room for the estimated spill. The folder is removed afterwards.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from osediff.core.build import trim_heap
from osediff.tiling.store import SpilledTensor, SpillFolder, Tier, TileStore, nbytes

log = logging.getLogger(__name__)

GIB = 2**30
# Working memory of one tile batch (its own state included) in units of its largest activation: a resnet at
# the widest level holds the residual, the normalised copy, its activation and the conv output at once, and
# oneDNN may reorder the input once more (measured on the SD-2.1 decoder at 2048², benchmarks/RESULTS.md).
RESERVE = 4.5
AUTO_FRACTION = 0.9  # of the memory available when the run starts (the rest: other programs, the page cache)


class MemoryBudgetError(MemoryError):
    """The --max-memory limit cannot hold what one step needs; the message gives the numbers."""


class SpillSpaceError(OSError):
    """The spill folder's disk has no room for the estimated spill; the message gives the numbers."""


# ----------------------------------------------------------------------------------------------------------
# Measurements (module functions, so tests can stand in for the machine)


def rss_bytes() -> int:
    """This process's resident memory now (Linux: /proc/self/statm; elsewhere psutil, else 0)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:
            return 0


def available_bytes() -> int | None:
    """Memory the system can give without swapping (MemAvailable of /proc/meminfo, else psutil; None: unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return None


def free_disk_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the disk that holds `path` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def in_use(device: torch.device) -> int:
    """What counts against the limit now: device memory held by torch on a GPU, else the process's RSS."""
    if device.type == "cuda":
        return torch.cuda.memory_reserved(device)
    return rss_bytes()


# ----------------------------------------------------------------------------------------------------------
# The limit


@dataclass(frozen=True)
class Budget:
    """The limit of a run in bytes (None: none) and why it is what it is (for --dry-run and the log)."""

    limit: int | None
    reason: str

    def __str__(self) -> str:
        return f"{_size(self.limit)} ({self.reason})" if self.limit else f"none ({self.reason})"


def choose_budget(max_memory: float | None, device: torch.device | str) -> Budget:
    """`--max-memory` in GiB -> a `Budget`: a number is taken as given, 0 means no limit (everything stays in
    memory), None picks AUTO_FRACTION of what is free now plus what this process already holds."""
    device = torch.device(device)
    if max_memory is not None:
        if max_memory < 0:
            raise ValueError(f"--max-memory must be >= 0 GiB (0 = no limit), got {max_memory}")
        if max_memory == 0:
            return Budget(None, "--max-memory 0: no limit")
        return Budget(int(max_memory * GIB), f"--max-memory {max_memory:g}")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_reserved(device)
        return Budget(int(held + AUTO_FRACTION * free),
                      f"auto: {AUTO_FRACTION:.0%} of the {free / GIB:.1f} GiB free on {device} (of "
                      f"{total / GIB:.1f}) + {held / GIB:.1f} GiB held by this process")
    avail = available_bytes()
    if avail is None:
        return Budget(None, "auto: free memory unknown on this system, no limit")
    held = rss_bytes()
    return Budget(int(held + AUTO_FRACTION * avail),
                  f"auto: {AUTO_FRACTION:.0%} of the {avail / GIB:.1f} GiB of memory available now + "
                  f"{held / GIB:.1f} GiB held by this process")


def default_spill_dir() -> Path:
    """Where the Python API spills when no folder is given (the CLI uses `<OUTDIR>/.osediff-spill`)."""
    return Path(tempfile.gettempdir()) / "osediff-spill"


# ----------------------------------------------------------------------------------------------------------
# One run within the limit


@dataclass
class _Parked:
    module: nn.Module
    tensors: list  # (tensor whose .data was replaced, SpilledTensor | host copy)


class MemorySession:
    """Keeps one pipeline call within `budget` (see the module docstring). Use as a context manager: on exit
    (success, error or Ctrl-C) parked weights come back and the spill folder is removed."""

    def __init__(self, budget: Budget, device: torch.device | str, spill_dir: str | os.PathLike | None = None):
        self.budget, self.device = budget, torch.device(device)
        self.spill = SpillFolder(spill_dir or default_spill_dir())
        self._parked: list[_Parked] = []
        self._told = False  # the first "spilling" line of a run is a warning, later ones are info

    def __enter__(self) -> MemorySession:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.restore()
        finally:
            self.spill.close()
            if self.spill.written:
                log.info("spilled %.2f GB to disk in this run (weights and tile states; %.1f s writing and "
                         "reading)", self.spill.written / 1e9, self.spill.seconds)

    # --- planning -------------------------------------------------------------------------------------------
    def check_disk(self, need: int) -> None:
        """Fail now if the spill folder's disk cannot take `need` bytes (with 10 % to spare)."""
        if need <= 0:
            return
        free = free_disk_bytes(self.spill.parent)
        if free < 1.1 * need:
            raise SpillSpaceError(
                f"--max-memory {self.budget}: this image needs to spill up to {need / 1e9:.1f} GB to "
                f"{self.spill.parent}, but that disk has {free / 1e9:.1f} GB free; give --spill-dir on a "
                f"disk with room, or a larger --max-memory")

    def vae_store(self, what: str, cost, idle: list[nn.Module], retile=None,
                  offload: str | None = None) -> TileStore | None:
        """Prepare a VAE stage (`what`: "encoder" / "decoder") of `cost` (`VaeCost`): park `idle` weights if
        needed, check the limit, and return the store its tile states use (None when untiled). `retile(tile)`
        (optional) gives the stage's `VaeCost` with another tile size, to suggest one that fits. `offload`
        ("cpu", --vae-offload): states wait there first, never on the compute device."""
        if self.budget.limit is None:
            return None
        work = int(RESERVE * cost.peak)
        room = self.budget.limit - in_use(self.device)
        if work + cost.states > room:
            self.park(idle)
            room = self.budget.limit - in_use(self.device)
        if work > room:
            fits = _largest_tile(retile, room) if retile is not None else None
            raise MemoryBudgetError(
                f"--max-memory {self.budget} is too small: one tile batch of the VAE {what} needs about "
                f"{_size(work)} beside the {_size(self.budget.limit - room)} in use (the weights it needs, the "
                f"images); give at least {_size(self.budget.limit - room + work)}, or a smaller "
                + (f"--vae-{what}-tile (about {fits} fits; " if fits else f"--vae-{what}-tile (") +
                "other tiles round differently, so compare outputs made with the same tiles)")
        if not cost.tiled:
            return None
        quota = room - work
        why = (f"the VAE {what}'s tile states (up to {cost.states / 1e9:.1f} GB) exceed the "
               f"{_size(max(quota, 0))} left of --max-memory {_size(self.budget.limit)} beside one tile batch")
        # --vae-offload: no state waits on the device; on a GPU host memory comes next, as far as it is free
        tiers = [Tier(None, quota)] if offload is None else []
        if self.device.type == "cuda" or offload is not None:
            tiers.append(Tier(offload or "cpu", AUTO_FRACTION * (available_bytes() or 0)))
        self.check_disk(cost.states - sum(t.quota for t in tiers))
        return TileStore(self.device, tiers, self.spill, pressure=lambda: in_use(self.device) + work - self.budget.limit,
                         on_spill=lambda: self._say(why, cost.states - max(quota, 0)))

    def _say(self, why: str, amount: int) -> None:
        log.log(logging.INFO if self._told else logging.WARNING, "%s: spilling up to %.1f GB of them to %s "
                "(removed afterwards)", why, amount / 1e9, self.spill.parent)
        self._told = True

    # --- weights --------------------------------------------------------------------------------------------
    def park(self, modules: list[nn.Module | None]) -> None:
        """Move the weights of `modules` off the compute device / out of memory until `restore`."""
        for m in modules:
            if m is None or any(p.module is m for p in self._parked):
                continue
            tensors = [*m.parameters(), *m.buffers()]
            size = sum(nbytes(t) for t in tensors)
            if self.device.type == "cuda":
                entry = _Parked(m, [(t, t.data.to("cpu")) for t in tensors])
            else:
                self.check_disk(size)
                log.info("parking the %s weights (%.2f GB) in %s while the VAE runs", type(m).__name__, size / 1e9,
                         self.spill.parent)
                entry = _Parked(m, [(t, self.spill.write(t.data)) for t in tensors])
            for t in tensors:
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
            self._parked.append(entry)
            trim_heap()
            log.debug("parked %s (%.2f GB)", type(m).__name__, size / 1e9)

    def restore(self) -> None:
        """Bring back every parked module's weights, bit for bit."""
        while self._parked:
            entry = self._parked.pop()
            for t, saved in entry.tensors:
                t.data = self.spill.read(saved, self.device) if isinstance(saved, SpilledTensor) else (
                    saved.to(self.device))


def _largest_tile(retile, room: int) -> int | None:
    """The largest tile size (a multiple of 8) whose tile batch fits in `room` bytes, or None."""
    for tile in range(2048, 7, -8):
        if RESERVE * retile(tile).peak <= room:
            return tile
    return None


def _size(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:.1f} MiB"

