"""Which quantisation-table orientation do real JPEG files have? Our differentiable JPEG against libjpeg.

For each image and quality, the image is round-tripped through Pillow's libjpeg (baseline, 4:2:0, the IJG
quality rule) and through `osediff.degradation.jpeg.jpeg` with `tables="standard"` (Annex K as printed) and
`tables="reference"` (transposed, the authors' DiffJPEG). The row gives the PSNR of each of ours to libjpeg's
decode: the orientation that libjpeg uses comes out far closer. The last column is the PSNR between our two
orientations (how different the two training distributions are per call). Two variants per image: its gray version
(flat chroma, so only the luminance table, the one whose orientation matters, is exercised, and libjpeg's chroma
upsampling plays no part) and the colour image itself.

    python benchmarks/bench_jpeg_tables.py ../shared/benchmarks/realsr/HR --images 8 --json benchmarks/results_cpu.jsonl

Needs only Pillow and torch; CPU, a few seconds per image.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def libjpeg_round_trip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """(H, W, 3) uint8 -> the same after a Pillow/libjpeg encode at `quality` (4:2:0) and decode."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling="4:2:0")
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 (or [0, 255] float) arrays."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def ours(rgb: np.ndarray, quality: int, tables: str) -> np.ndarray:
    """(H, W, 3) uint8 -> our JPEG round trip, rounded to 8 bits as a decoder would, with edge replication."""
    from osediff.degradation.jpeg import jpeg

    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].double() / 255
    y = jpeg(x, float(quality), pad_mode="replicate", tables=tables)
    return (y[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def measure(paths: list[Path], qualities: list[int]) -> list[dict]:
    from PIL import Image

    rows = []
    for path in paths:
        with Image.open(path) as im:
            colour = np.asarray(im.convert("RGB"))
            gray = np.repeat(np.asarray(im.convert("L"))[..., None], 3, axis=2)
        for variant, rgb in (("gray", gray), ("colour", colour)):
            for q in qualities:
                ref = libjpeg_round_trip(rgb, q)
                std, tr = ours(rgb, q, "standard"), ours(rgb, q, "reference")
                rows.append({"image": path.name, "variant": variant, "quality": q, "psnr_standard": psnr(std, ref),
                             "psnr_reference": psnr(tr, ref), "psnr_between": psnr(std, tr)})
    return rows


def summary(rows: list[dict], qualities: list[int]) -> list[dict]:
    out = []
    for variant in ("gray", "colour"):
        for q in qualities:
            sel = [r for r in rows if r["variant"] == variant and r["quality"] == q]
            std = [r["psnr_standard"] for r in sel]
            ref = [r["psnr_reference"] for r in sel]
            between = [r["psnr_between"] for r in sel]
            out.append({"variant": variant, "quality": q, "images": len(sel),
                        "standard_median_db": statistics.median(std), "reference_median_db": statistics.median(ref),
                        "standard_closer": int(sum(s > r for s, r in zip(std, ref))),
                        "between_median_db": statistics.median(between), "between_min_db": min(between),
                        "between_max_db": max(between)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="folder of real images (PNG or any format Pillow reads)")
    p.add_argument("--images", type=int, default=8, help="use the first N images, sorted by name")
    p.add_argument("--qualities", default="30,50,75,95", help="comma-separated JPEG qualities")
    p.add_argument("--json", help="append one JSON line per (variant, quality) to this file")
    a = p.parse_args()
    from osediff.files.images import is_image_file

    paths = sorted(q for q in Path(a.folder).iterdir() if is_image_file(q))[:a.images]
    qualities = [int(q) for q in a.qualities.split(",")]
    table = summary(measure(paths, qualities), qualities)
    print(f"PSNR (dB) of osediff's JPEG to Pillow/libjpeg's decode, median over {len(paths)} images of {a.folder}")
    print("(standard closer: images where 'standard' is nearer libjpeg; between: standard vs reference, median "
          "[min, max])")
    print(f"{'variant':8} {'q':>3} {'standard':>9} {'reference':>10} {'standard closer':>16} {'between':>22}")
    for r in table:
        print(f"{r['variant']:8} {r['quality']:>3} {r['standard_median_db']:>9.2f} {r['reference_median_db']:>10.2f} "
              f"{r['standard_closer']:>13d}/{r['images']:<2} {r['between_median_db']:>8.2f} "
              f"[{r['between_min_db']:.1f}, {r['between_max_db']:.1f}]")
    if a.json:
        with open(a.json, "a") as f:
            for r in table:
                f.write(json.dumps({"bench": "jpeg_tables", "folder": a.folder, **r}) + "\n")


if __name__ == "__main__":
    main()
