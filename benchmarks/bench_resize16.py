"""A 24-megapixel photo read, resized and written: time and peak RSS, 8-bit and 16-bit, before and after the
banded 16-bit resize (issue 19, item 4).

Each configuration runs in a fresh process (`--one`), so its peak RSS (/proc/self/status VmHWM) is its own:
read the file (8-bit PNG through Pillow, 16-bit TIFF through tifffile), resize (8-bit: PIL BICUBIC, the
reference's path; 16-bit: `osediff.core.resample.resize_bicubic` on float32, or with `--impl dense` the dense
float64-built matrices it used before), write the result (same format as the input). The input is made once
under a temporary folder.

    python benchmarks/bench_resize16.py --json benchmarks/results_cpu.jsonl
    python benchmarks/bench_resize16.py --size 600x400   # a quick smoke test

Prints a Markdown table and appends one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def dense_resize(x, size):
    """The 16-bit path before issue 19: dense (out x in) float64 matrices from a Python loop, cast to float32,
    then `M_y @ x @ M_x^T`."""
    import torch

    def matrix(n, m):
        from osediff.core.resample import _bicubic

        scale = n / m
        fs = max(scale, 1.0)
        mat = torch.zeros(m, n, dtype=torch.float64)
        for i in range(m):
            c = (i + 0.5) * scale
            lo, hi = max(int(c - 2 * fs + 0.5), 0), min(int(c + 2 * fs + 0.5), n)
            w = [_bicubic((j - c + 0.5) / fs) for j in range(lo, hi)]
            for j, wj in zip(range(lo, hi), w):
                mat[i, j] = wj / sum(w)
        return mat

    my = matrix(x.shape[-2], size[0]).float()
    mx = matrix(x.shape[-1], size[1]).float()
    return my @ x.float() @ mx.T


def one(src: str, bits: int, impl: str, out_size: tuple[int, int], dst: str) -> dict:
    """Read `src`, resize to out_size (W, H), write `dst`; seconds per step and this process's peak RSS."""
    import numpy as np
    import torch

    from osediff.core.resample import resize_bicubic
    from osediff.files.images import Picture, read_image, write_image

    t0 = time.perf_counter()
    pic = read_image(src, max_megapixels=0)
    t1 = time.perf_counter()
    if bits == 8:
        from PIL import Image

        rgb = np.asarray(Image.fromarray(pic.rgb, "RGB").resize(out_size, Image.BICUBIC))
    else:
        # the conversions of `OSEDiffPipeline.run_pictures`' 16-bit path, in place like there
        a = pic.rgb[None].astype(np.float32)
        del pic
        a /= 65535
        y = (resize_bicubic if impl == "banded" else dense_resize)(torch.from_numpy(a).permute(0, 3, 1, 2),
                                                                    (out_size[1], out_size[0]))
        del a
        y = y.clamp_(0, 1)[0].permute(1, 2, 0).numpy()
        y *= 65535
        rgb = np.round(y, out=y).astype(np.uint16)
        del y
    t2 = time.perf_counter()
    write_image(dst, Picture(np.ascontiguousarray(rgb)))
    t3 = time.perf_counter()
    # VmHWM, not getrusage: ru_maxrss of a fork+exec'd child starts at its parent's peak
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    peak = int(hwm.split()[1]) / 2**20  # KiB -> GiB
    return {"read_s": t1 - t0, "resize_s": t2 - t1, "write_s": t3 - t2, "total_s": t3 - t0, "peak_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="6000x4000", help="input WxH (24 MP by default)")
    ap.add_argument("--factors", default="0.5,2", help="resize factors to time")
    ap.add_argument("--impls", default="banded,dense", help="16-bit implementations: banded (now), dense (before)")
    ap.add_argument("--json", help="append one JSON line per configuration to this file")
    ap.add_argument("--one", nargs=5, metavar=("SRC", "BITS", "IMPL", "WxH", "DST"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        src, bits, impl, size, dst = a.one
        w, h = (int(v) for v in size.split("x"))
        print(json.dumps(one(src, int(bits), impl, (w, h), dst)))
        return

    import numpy as np

    from osediff.files.images import Picture, write_image
    from osediff.files.samples import sample_rgb

    w, h = (int(v) for v in a.size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rgb8 = sample_rgb(w, h, 0)
        write_image(f"{tmp}/in8.png", Picture(rgb8))
        write_image(f"{tmp}/in16.tiff", Picture(rgb8.astype(np.uint16) * 257 + np.uint16(100)))
        del rgb8
        for f in (float(v) for v in a.factors.split(",")):
            size = f"{round(w * f)}x{round(h * f)}"
            configs = [(8, "pil")] + [(16, impl) for impl in a.impls.split(",")]
            for bits, impl in configs:
                src, dst = (f"{tmp}/in8.png", f"{tmp}/out.png") if bits == 8 else (f"{tmp}/in16.tiff", f"{tmp}/out.tiff")
                r = subprocess.run([sys.executable, __file__, "--one", src, str(bits), impl, size, dst],
                                   capture_output=True, text=True)
                if r.returncode:
                    print(r.stderr[-2000:], file=sys.stderr)
                    continue
                res = json.loads(r.stdout.strip().splitlines()[-1])
                image_gib = w * h * 3 * (bits // 8) / 2**30
                rows.append({"bench": "resize16", "input": a.size, "output": size, "bits": bits, "impl": impl,
                             "image_gib": image_gib, **res, "host": platform.node(),
                             "date": time.strftime("%Y-%m-%d")})
                print(f"| {bits} | {impl} | {a.size} → {size} | {res['read_s']:.2f} | {res['resize_s']:.2f} | "
                      f"{res['write_s']:.2f} | {res['total_s']:.2f} | {res['peak_gib']:.2f} | {image_gib:.2f} |",
                      flush=True)
    if a.json:
        with open(a.json, "a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
