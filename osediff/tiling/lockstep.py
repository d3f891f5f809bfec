"""Tiles that run a network in lockstep: geometry (core + halo boxes, how far wrong values creep in at each
level) and the driver that pauses every tile at each sync point. Used by `osediff.tiling.vae`, which supplies the
network "programs" and what happens at the sync points (spec §1.6.1, done exactly).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from osediff.tiling.store import TileStore


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------------------
# Tile geometry


@dataclass
class Axis:
    """One axis of a tile at the current resolution level, in tile-local px."""

    size: int  # tile extent
    lo: int  # core start
    hi: int  # core end
    at_lo: bool  # the tile's start is the image border (zero padding there is what untiled sees)
    at_hi: bool
    bad_lo: int = 0  # px next to the start that are wrong (computed from missing context)
    bad_hi: int = 0


@dataclass
class Geometry:
    """Geometry shared by all tiles of a batch: where the core sits and how far garbage has crept in."""

    axes: tuple[Axis, Axis]  # (y, x)
    strict: bool = True  # raise if the core ever stops being exact (False when a test forces the halo)

    def conv(self, reach: int) -> None:
        for a in self.axes:
            a.bad_lo += 0 if a.at_lo else reach
            a.bad_hi += 0 if a.at_hi else reach

    def down(self) -> None:
        # Downsample2D: output o reads input px 2o..2o+2, the last being the zero pad after the tile's end.
        for a in self.axes:
            a.size, a.lo, a.hi = a.size // 2, a.lo // 2, a.hi // 2
            a.bad_lo = -(-a.bad_lo // 2)
            a.bad_hi = 0 if a.at_hi else (a.bad_hi + 2) // 2

    def up(self, reach: int) -> None:
        for a in self.axes:
            a.size, a.lo, a.hi, a.bad_lo, a.bad_hi = (2 * v for v in (a.size, a.lo, a.hi, a.bad_lo, a.bad_hi))
        self.conv(reach)

    def crop_valid(self, h: torch.Tensor) -> torch.Tensor:
        """Drop the wrong border px (never any of the core), so they are not upsampled and convolved."""
        cut = [(min(a.bad_lo, a.lo), min(a.bad_hi, a.size - a.hi)) for a in self.axes]
        for a, (lo, hi) in zip(self.axes, cut):
            a.size, a.lo, a.hi = a.size - lo - hi, a.lo - lo, a.hi - lo
            a.bad_lo, a.bad_hi = a.bad_lo - lo, a.bad_hi - hi
        (y0, y1), (x0, x1) = cut
        return h[:, :, y0 : h.shape[2] - y1, x0 : h.shape[3] - x1]

    def core(self, h: torch.Tensor) -> torch.Tensor:
        y, x = self.axes
        return h[:, :, y.lo : y.hi, x.lo : x.hi]

    def check_exact(self) -> None:
        if self.strict and any(a.bad_lo > a.lo or a.bad_hi > a.size - a.hi for a in self.axes):
            raise RuntimeError(f"tile core is no longer exact ({self.axes}); the halo derivation is wrong")


def spans(n: int, tile: int, align: int) -> list[tuple[int, int]]:
    """Cores partitioning [0, n): equal, `align`-aligned, at most max(tile, align) long (the last may be
    shorter). n must be a multiple of `align`."""
    k = cdiv(n, max(tile, align))
    size = cdiv(cdiv(n, k), align) * align
    return [(s, min(s + size, n)) for s in range(0, n, size)]


@dataclass
class Tile:
    """State of one batch of same-geometry tiles. Tensors that live across a sync point are kept here
    (never in a program's locals) so the driver can park them elsewhere (`osediff.tiling.store`)."""

    geo: Geometry
    cores: list[tuple[int, int, int, int]]  # (y0, y1, x0, x1) per stacked tile, input px
    boxes: list[tuple[int, int, int, int]]  # core + halo, clipped to the image
    h: torch.Tensor | None = None  # (n·B, C, h, w), index = tile·B + image
    skip: torch.Tensor | None = None  # residual input of the current resnet/attention

    @property
    def n(self) -> int:
        return len(self.cores)


def make_tiles(shape: tuple[int, int], tile: int, align: int, halo: int, tile_batch: int, strict: bool):
    """Tile states for a (H, W) map, tiles with equal geometry stacked in groups of `tile_batch`."""
    groups: dict[tuple, list] = {}
    per_axis = [spans(n, tile, align) for n in shape]
    for (y0, y1), (x0, x1) in itertools.product(*per_axis):
        axes, box = [], []
        for (c0, c1), n in zip(((y0, y1), (x0, x1)), shape):
            b0, b1 = max(c0 - halo, 0), min(c1 + halo, n)
            axes.append((b1 - b0, c0 - b0, c1 - b0, b0 == 0, b1 == n))
            box += [b0, b1]
        groups.setdefault(tuple(axes), []).append(((y0, y1, x0, x1), tuple(box)))
    tiles = []
    for axes, members in groups.items():
        for i in range(0, len(members), tile_batch):
            chunk = members[i : i + tile_batch]
            geo = Geometry((Axis(*axes[0]), Axis(*axes[1])), strict=strict)
            tiles.append(Tile(geo, [c for c, _ in chunk], [b for _, b in chunk]))
    return tiles


# ----------------------------------------------------------------------------------------------------------
# Lockstep driver


class Sync(NamedTuple):
    """What a tile program yields at a sync point: its part, and how to combine all parts."""

    value: Any
    reduce: Callable[[list[Any]], Any]


TileProgram = Generator[Sync, Any, torch.Tensor]


def run_lockstep(
    tiles: list[Tile],
    program: Callable[[Tile], TileProgram],
    store: TileStore,
    paste: Callable[[Tile, torch.Tensor], None],
    on_step: Callable[[int], None] | None = None,
) -> None:
    """Run one program per tile batch, all pausing at every sync point; `paste` each final result.

    Between sync points each tile's state waits in `store` (fetched before the tile runs, parked after).
    `on_step(steps_done)` is called after each tile batch ran to its next sync point (progress reports)."""
    gens = [program(t) for t in tiles]
    shared: Any = None  # the combined parts of the last sync point, sent to every program
    steps = 0
    while gens:
        parts, running = [], []
        for g, t in zip(gens, tiles):
            store.fetch(t)
            try:
                parts.append(g.send(shared))
                finished = False
            except StopIteration as stop:
                paste(t, stop.value)
                t.h = t.skip = None
                store.drop(t)
                finished = True
            steps += 1
            if on_step is not None:
                on_step(steps)
            if finished:
                continue
            store.park(t)
            running.append((g, t))
        if running and len(running) != len(gens):
            raise RuntimeError("tile programs fell out of step")
        shared = None  # drop the last combined value (e.g. K/V) before making the next
        shared = parts[0].reduce([p.value for p in parts]) if parts else None
        del parts  # free the per-tile parts (e.g. K/V) before the programs resume
        gens, tiles = [g for g, _ in running], [t for _, t in running]
