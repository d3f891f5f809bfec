"""Time and peak memory of one OSEDiff training step (spec §4) on the full-size architecture, random weights.

Runs the real `osediff train` in this process twice per batch size, with 1 and with 1 + --steps steps, so
the time per step is the difference divided by --steps (setup and the first step's warm-up cancel). Data:
random 768² HQ images written to a temporary folder; `--prompts none`, `--lambda-lpips 0` (the LPIPS VGG
weights are a download; LPIPS adds one VGG-16 forward/backward per step). Peak = CUDA max allocated of the
longer run (CPU: this process's peak RSS, cumulative).

    python benchmarks/bench_train_step.py --batches 1,2,4 --mixed-precision fp16 --json results_train.jsonl
    python benchmarks/bench_train_step.py --tiny --device cpu --batches 1 --crop 96 --mixed-precision no
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed_train(args: list[str], device: str) -> tuple[float, float]:
    from osediff.cli import main

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    rc = main(["train", *args])
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    if rc not in (0, None):
        raise RuntimeError(f"osediff train exited with {rc}")
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    return wall, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="1,2,4")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    p.add_argument("--mixed-precision", default="fp16", choices=["no", "fp16", "bf16"])
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--tiny", action="store_true", help="tiny architecture: a smoke test of this script")
    p.add_argument("--json", help="append one JSON line per batch size to this file")
    a = p.parse_args()

    from PIL import Image

    from osediff.testing import make_tiny_sd

    work = Path(tempfile.mkdtemp())
    base = make_tiny_sd(work / "sd", full=not a.tiny)
    data = work / "hq"
    data.mkdir()
    rng = np.random.default_rng(0)
    side = max(a.crop + a.crop // 2, 96)
    for i in range(8):
        small = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((side, side), Image.BICUBIC).save(data / f"{i}.png")
    name = torch.cuda.get_device_name() if a.device == "cuda" else None
    print(f"# training step, {name or 'cpu'}, crop {a.crop}, {a.mixed_precision}, checkpointing {a.checkpointing}")
    print("| batch | s / step | peak GiB |\n|---|---|---|", flush=True)
    for b in [int(x) for x in a.batches.split(",")]:
        common = ["--data", str(data), "--base", str(base), "--crop", str(a.crop), "--batch-size", str(b),
                  "--prompts", "none", "--lambda-lpips", "0", "--mixed-precision", a.mixed_precision,
                  "--checkpoint-every", "100000", "--log-every", "1",
                  "--gradient-checkpointing" if a.checkpointing else "--no-gradient-checkpointing"]
        try:
            t1, _ = timed_train([*common, "-o", str(work / f"r{b}a"), "--max-steps", "1"], a.device)
            tn, peak = timed_train([*common, "-o", str(work / f"r{b}b"), "--max-steps", str(1 + a.steps)], a.device)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            print(f"| {b} | FAILED: {str(e)[:120]} | |", flush=True)
            continue
        r = dict(device=a.device, gpu=name, dtype=a.mixed_precision, size=a.crop, batch=b, compile=False,
                 gradient_checkpointing=a.checkpointing, median_s=(tn - t1) / a.steps, peak_gib=peak,
                 tiny=a.tiny, what="one training step (generator + fake score updates), lambda_lpips 0")
        print(f"| {b} | {r['median_s']:.3f} | {peak:.2f} |", flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
