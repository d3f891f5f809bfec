"""`osediff degrade HQ_DIR -o LQ_DIR`: write a synthetic LQ partner for every HQ image (spec §4.3, §4.7).

Each image is degraded on its own with a generator seeded from `--seed` and the file name, so an output does
not depend on which other files are in the folder or on their order. Outputs are PNGs named like the inputs
(`photo.jpg` -> `photo.png`), written under a temporary name and renamed into place; the resolved options go
to `LQ_DIR/degradation.json`. Unreadable images are reported and skipped, and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import hashlib

from osediff.degradation.jpeg_tables import JPEG_TABLES, JPEG_TABLES_HELP

HELP = "degrade HQ images into paired LQ training images (Real-ESRGAN pipeline, or the face pipeline)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hq_dir", metavar="HQ_DIR", help="folder of HQ images (any format PIL reads)")
    parser.add_argument("-o", "--output", dest="lq_dir", metavar="LQ_DIR", required=True, help="output folder")
    parser.add_argument("--config", default=None,
                        help="degradation YAML (default: the shipped params_realesrgan.yml, or "
                             "params_codeformer.yml with --face)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default: %(default)s)")
    parser.add_argument("--scale", type=int, default=None,
                        help="downscaling factor, overrides the config's `scale` (default: the config's, 4)")
    parser.add_argument("--jpeg-tables", choices=JPEG_TABLES, default=None,
                        help=JPEG_TABLES_HELP + " Overrides the config's `jpeg_tables` (default: the config's, "
                             "reference). Not with --face, whose JPEG is libjpeg itself.")
    parser.add_argument("--face", action="store_true", help="use the face pipeline (spec §4.7)")
    parser.add_argument("--resize-back", action=argparse.BooleanOptionalAction, default=True,
                        help="resize the LQ back to the HQ size (default: %(default)s); "
                             "--no-resize-back writes the H/scale x W/scale LQ")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved options and the number of inputs, then stop")


def image_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the base seed and a file name, stable across runs and platforms."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import logging
    from pathlib import Path

    import numpy as np
    import torch
    from PIL import Image
    from tqdm import tqdm

    from osediff.degradation.face import FaceDegradationConfig, degrade_face
    from osediff.degradation.realesrgan import DegradationConfig, degrade
    from osediff.files.atomic import write_bytes
    from osediff.files.images import Picture, is_image_file, write_image

    log = logging.getLogger("osediff.degrade")
    hq_dir, lq_dir = Path(args.hq_dir), Path(args.lq_dir)
    if not hq_dir.is_dir():
        log.error("not a folder: %s", hq_dir)
        return 2
    if args.face and (args.scale is not None or not args.resize_back):
        log.error("--scale and --no-resize-back do not apply to --face (it always returns the HQ size)")
        return 2
    if args.face and args.jpeg_tables is not None:
        log.error("--jpeg-tables does not apply to --face (its JPEG is libjpeg's, through Pillow)")
        return 2
    try:
        if args.face:
            cfg = FaceDegradationConfig.from_yaml(args.config)
        else:
            cfg = DegradationConfig.from_yaml(args.config)
            if args.scale is not None:
                cfg = dataclasses.replace(cfg, scale=args.scale)
            if args.jpeg_tables is not None:
                cfg = dataclasses.replace(cfg, jpeg_tables=args.jpeg_tables)
    except (OSError, ValueError) as e:
        log.error("bad --config: %s", e)
        return 2

    inputs = sorted(p for p in hq_dir.iterdir() if is_image_file(p))
    resolved = {"pipeline": "face" if args.face else "realesrgan", "config": dataclasses.asdict(cfg),
                "seed": args.seed, "resize_back": args.resize_back, "hq_dir": str(hq_dir)}
    if args.dry_run:
        print(json.dumps(resolved, indent=2))
        print(f"{len(inputs)} input images")
        return 0

    lq_dir.mkdir(parents=True, exist_ok=True)
    write_bytes(lq_dir / "degradation.json", json.dumps(resolved, indent=2, sort_keys=True).encode())
    device = torch.device(args.device)
    failed: list[str] = []
    seen: dict[str, str] = {}
    for path in tqdm(inputs, desc="degrade", unit="img"):
        out_name = path.stem + ".png"
        if out_name in seen:
            log.error("%s: skipped, its output name %s is taken by %s", path.name, out_name, seen[out_name])
            failed.append(path.name)
            continue
        seen[out_name] = path.name
        try:
            with Image.open(path) as im:
                arr = np.array(im.convert("RGB"))
            hq = torch.from_numpy(arr).to(device).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
            generator = torch.Generator(device).manual_seed(image_seed(args.seed, path.name))
            lq = degrade_face(hq, cfg, generator) if args.face else \
                degrade(hq, cfg, generator, resize_back=args.resize_back)
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # unreadable, or too small
            log.error("%s: skipped (%s: %s)", path.name, type(e).__name__, e)
            failed.append(path.name)
            continue
        out = (lq[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        write_image(lq_dir / out_name, Picture(out))

    log.info("wrote %d LQ images to %s", len(inputs) - len(failed), lq_dir)
    if failed:
        log.error("%d of %d inputs failed: %s", len(failed), len(inputs), ", ".join(failed))
        return 1
    return 0
