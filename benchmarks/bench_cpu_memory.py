"""Whole-process peak RSS (and wall time) of `osediff sr` on the CPU, the way a user runs it.

Each configuration is one fresh `python -m osediff sr` process on `--images` copies of a (size/4)² input,
with the full-size SD 2.1-base architecture and random weights (a folder built once under /tmp, ~3.5 GB) and a
random OSEDiff LoRA, `--no-dape`. Peak RSS is the kernel's maximum resident set of that process (wait4), so
it includes loading and merging the model; time is the process's wall clock, load included.

    python benchmarks/bench_cpu_memory.py --dtypes bf16,fp32 --json benchmarks/results_cpu.jsonl
    python benchmarks/bench_cpu_memory.py --tiny --dtypes auto   # a smoke test of this script
    python benchmarks/bench_cpu_memory.py --dtypes bf16 --sizes 1024,2048 --max-memory 0,4   # issue 22

With `--max-memory A,B` every size runs once per value (0 = no limit, '' = auto); the table adds time per
megapixel, the spill volume (from the run's closing log line) and whether each PNG equals the first row's.

Prints a Markdown table and appends one JSON line per configuration (device, dtype, size, batch, compile,
median_s, peak_gib, tiny, ...). Time is only comparable between rows of one run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ensure_model(folder: Path, tiny: bool) -> tuple[Path, Path]:
    """(SD folder, osediff.pkl), built with random weights on first use."""
    from osediff.testing import make_authors_checkpoint, make_tiny_sd

    ckpt = folder / "osediff.pkl"
    if not ckpt.exists():
        make_tiny_sd(folder, full=not tiny)
        make_authors_checkpoint(folder, ckpt)
    return folder, ckpt


def run_sr(base: Path, ckpt: Path, inputs: Path, dtype: str, extra: list[str],
           out: Path | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GiB, stderr tail) of one `osediff sr` process (writing into `out`)."""
    out = out or Path(tempfile.mkdtemp())
    cmd = [sys.executable, "-m", "osediff", "sr", str(inputs), "-o", str(out), "--base", str(base), "--weights",
           str(ckpt), "--no-dape", "--device", "cpu", "--dtype", dtype, *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or len(list(out.iterdir())) != len(list(inputs.iterdir())):
        raise RuntimeError(f"osediff sr failed ({proc.returncode}): {err.strip().splitlines()[-3:]}")
    return wall, usage.ru_maxrss / 2**20, err  # ru_maxrss is in KiB on Linux


def cpu_info() -> dict:
    """CPU model name, threads, and which native-bf16 flags /proc/cpuinfo lists (empty: bf16 is emulated)."""
    name, flags = platform.processor(), set()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = ln.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags |= set(value.split())
    except OSError:
        pass
    return {"cpu": name, "threads": os.cpu_count(), "native_bf16": sorted(flags & {"avx512_bf16", "amx_bf16"})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="bf16,fp32", help="--dtype values of osediff sr, comma separated")
    p.add_argument("--size", type=int, default=512, help="output side (the input is size/4)")
    p.add_argument("--sizes", help="several output sides, comma separated (instead of --size)")
    p.add_argument("--max-memory", default="",
                   help="--max-memory values to run each size with, comma separated ('' = the default, auto); "
                        "rows of one size are compared byte for byte (the PNG files)")
    p.add_argument("--images", type=int, default=1, help="images per process")
    p.add_argument("--runs", type=int, default=1, help="processes per configuration (median time)")
    p.add_argument("--model-dir", default=None, help="where the random full-size model is built/reused")
    p.add_argument("--tiny", action="store_true", help="tiny architecture: a smoke test of this script")
    p.add_argument("--label", default="", help="free text stored with each JSON line (e.g. before/after)")
    p.add_argument("--json", help="append one JSON line per configuration to this file")
    a = p.parse_args()


    folder = Path(a.model_dir or f"/tmp/osediff-sd21-{'tiny' if a.tiny else 'full'}")
    base, ckpt = ensure_model(folder, a.tiny)
    extra = ["--process-size", "64"] if a.tiny else []
    info = cpu_info()
    import torch

    print(f"# {info['cpu']}, {info['threads']} threads, native bf16: {info['native_bf16'] or 'no'}; "
          f"torch {torch.__version__}")
    print("| dtype (picked) | input → output | --max-memory | images | median s (whole process) | s/MP | peak RSS GiB "
          "| spilled GB | same PNG as first row |\n|---|---|---|---|---|---|---|---|---|")
    for size in [int(v) for v in a.sizes.split(",")] if a.sizes else [a.size]:
        inputs = make_inputs(size, a.images)
        for dtype in a.dtypes.split(","):
            first = None
            for mm in a.max_memory.split(","):
                walls, peaks, picked, spills, io_s = [], [], dtype, [], []
                flags = extra + (["--max-memory", mm] if mm else [])
                for _ in range(a.runs):
                    out = Path(tempfile.mkdtemp())
                    wall, peak, err = run_sr(base, ckpt, inputs, dtype, flags, out)
                    walls.append(wall)
                    peaks.append(peak)
                    lines = [ln for ln in err.splitlines() if "spilled " in ln and " GB to disk" in ln]
                    spills.append(sum(float(ln.split("spilled ", 1)[1].split(" GB")[0]) for ln in lines))
                    io_s.append(sum(float(ln.split("; ", 1)[1].split(" s ")[0]) for ln in lines if "; " in ln))
                    picked = next((ln.split("precision ", 1)[1].split(" ")[0] for ln in err.splitlines()
                                   if "precision " in ln), dtype)
                pngs = sorted(out.glob("*.png"))
                same = None if first is None else all(x.read_bytes() == y.read_bytes() for x, y in zip(first, pngs))
                first = first or pngs
                r = dict(device="cpu", gpu=None, dtype=dtype, picked=picked, size=size, batch=1, images=a.images,
                         compile=False, median_s=statistics.median(walls), times=walls, peak_gib=max(peaks),
                         max_memory=mm or "auto", spilled_gb=max(spills), spill_io_s=max(io_s), same_png_as_first=same,
                         s_per_mp=statistics.median(walls) / a.images / (size * size / 1e6),
                         tiny=a.tiny, what="osediff sr, whole process incl. load, --no-dape", label=a.label,
                         torch=torch.__version__, **info)
                print(f"| {dtype} ({picked}) | {size // 4}² → {size}² | {mm or 'auto'} | {a.images} | "
                      f"{r['median_s']:.1f} | {r['s_per_mp']:.1f} | {r['peak_gib']:.2f} | {r['spilled_gb']:.2f} | "
                      f"{'—' if same is None else same} |", flush=True)
                if a.json:
                    with open(a.json, "a") as f:
                        f.write(json.dumps(r) + "\n")


def make_inputs(size: int, images: int) -> Path:
    """A folder of `images` smooth random (size/4)² PNGs: photo-like statistics matter little for time or memory."""
    import numpy as np
    from PIL import Image

    inputs = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    lq = size // 4
    small = rng.integers(0, 256, (lq // 8 + 1, lq // 8 + 1, 3), dtype=np.uint8)
    for i in range(images):
        Image.fromarray(small).resize((lq, lq), Image.BICUBIC).save(inputs / f"{i}.png")
    return inputs


if __name__ == "__main__":
    main()
