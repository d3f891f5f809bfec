"""`osediff sr INPUT [INPUT ...] -o OUTDIR --base SD --weights PKL`: super-resolve images (issue contract)."""

from __future__ import annotations

import argparse

HELP = "super-resolve images (files, folders, globs) into OUTDIR"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that say which weights to load and where to run them (shared by `osediff sr` and `osediff ui`)."""
    from osediff.core.options import DTYPE_CHOICES

    p.add_argument("--base", help="SD 2.1-base: diffusers folder, one A1111/ComfyUI file (v2-1_512-ema-pruned.safetensors "
                        "or .ckpt), or hub id (env OSEDIFF_BASE); default: the models folder, then the Hugging "
                        "Face cache, then a download")
    p.add_argument("--weights", help="osediff.pkl or .safetensors (env OSEDIFF_WEIGHTS)")
    p.add_argument("--ram", help="ram_swin_large_14m.pth (env OSEDIFF_RAM)")
    p.add_argument("--dape", help="DAPE.pth (env OSEDIFF_DAPE)")
    p.add_argument("--no-dape", dest="use_dape", action="store_false", help="no tags: prompt is the user prompt only")
    p.add_argument("--no-merge", dest="merge", action="store_false",
                   help="keep LoRA as peft adapters like the reference (slower; bit-faithful in fp16)")
    p.add_argument("--offline", action="store_true",
                   help="never download missing weights (also HF_HUB_OFFLINE=1 or OSEDIFF_OFFLINE=1)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: cuda, else mps, else cpu")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="auto (default): fp16 on cuda/mps; on cpu bf16 where it is native (AVX512-BF16/AMX), else "
                        "fp32; vae-bf16 = VAE in bf16, rest fp32 (closer to fp32); --dry-run shows the pick")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from osediff.config import add_dataclass_arguments
    from osediff.core.options import FileOptions, SROptions

    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    add_model_arguments(p)
    p.add_argument("--ext", default="png",
                   help="output format: png (default; 16-bit for deeper sources), jpg, webp, tiff (16-bit), heic "
                        "(10-bit), avif, jxl, ..., or auto: per input JPEG->jpg, PNG->png, WebP->webp, TIFF->tiff, "
                        "HEIC/AVIF/JXL->png, RAW->16-bit tiff")
    p.add_argument("--suffix", default="", help="appended to output names: <stem>_<suffix>.<ext>")
    p.add_argument("--skip-existing", action="store_true", help="skip inputs whose output already exists (resume)")
    p.add_argument("--save-prompts", action="store_true", help="write each prompt to OUTDIR/txt/<name>.txt")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images of one size run through the networks together (GPU throughput)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and VAE (same function; pays on GPUs after a one-off compile)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved options and inputs, run nothing")
    add_dataclass_arguments(p, SROptions, help={
        "scale": "upscaling factor, any number (2.5: output round(2.5·W) x round(2.5·H))",
        "long_side": "output long side in pixels, aspect kept (instead of --scale)",
        "size": "output size WxH, e.g. 3840x2160 (instead of --scale; a different aspect stretches)",
        "process_size": "inputs with a side below process_size/scale are enlarged first",
        "max_guard_megapixels": "that enlargement stops where the processed image reaches this many megapixels "
                                "(extreme aspect ratios); 0 = no cap",
        "color_fix": "colour correction against the upscaled input", "prompt": "user text appended to the tags",
        "tile": "latent tile size (latent px)", "tile_overlap": "latent tile overlap (latent px)",
        "tile_batch": "latent/VAE tiles per network call", "vae_encoder_tile": "VAE encoder tile (image px)",
        "vae_decoder_tile": "VAE decoder tile (latent px)",
        "vae_offload": "keep tiled-VAE state in host memory (least GPU memory for huge images; slower)",
        "max_memory": "GiB the run may use: GPU memory on a GPU, the process's RAM on a CPU; what does not fit "
                      "spills to --spill-dir, the output is the same bit for bit. None = auto (90%% of the free "
                      "memory, see --dry-run), 0 = no limit",
        "spill_dir": "folder for spilled tile states and idle weights (default OUTDIR/.osediff-spill; removed "
                     "after the run)",
        "sample_latent": "sample the VAE posterior like the reference (default: its mean)",
        "seed": "seed for --sample-latent"})
    add_dataclass_arguments(p, FileOptions, help={
        "max_input_megapixels": "refuse, before decoding, files whose header claims more pixels; 0 = no limit",
        "strip_metadata": "write no ICC profile, EXIF (camera, date, GPS), text or DPI into the outputs",
        "keep_rgb": "write grayscale inputs as RGB (otherwise grayscale: the BT.601 luma of the result)"})


def run(args: argparse.Namespace) -> int:
    import logging
    from dataclasses import replace
    from pathlib import Path

    from osediff.config import dataclass_from_args, to_json
    from osediff.core.batch import ignored_line, scan_inputs, super_resolve_files
    from osediff.core.options import FileOptions, SROptions
    from osediff.weights.locate import MissingWeightsError

    try:
        options = dataclass_from_args(SROptions, args)
        files = dataclass_from_args(FileOptions, args)
        if options.spill_dir is None:
            options = replace(options, spill_dir=str(Path(args.output) / ".osediff-spill"))
    except ValueError as e:
        raise SystemExit(f"osediff sr: {e}") from None
    try:
        if args.dry_run:
            print(to_json(options))
            print(to_json(files))
            print(_precision_line(args.device, args.dtype))
            print(_memory_line(args.device, options))
            scan = scan_inputs(args.inputs)
            for p in scan.images:
                print(p)
            if scan.ignored:
                print(f"# {ignored_line(scan.ignored)}")
            if not scan.images:
                print(f"# no images found in {', '.join(args.inputs)}")
                return 2
            return 0
        return super_resolve_files(args.inputs, args.output, base=args.base, weights=args.weights, dape=args.dape,
                                   ram=args.ram, use_dape=args.use_dape, device=args.device, dtype=args.dtype,
                                   options=options, ext=args.ext, suffix=args.suffix,
                                   skip_existing=args.skip_existing, save_prompts=args.save_prompts,
                                   batch_size=args.batch_size, merge=args.merge, compile=args.compile,
                                   offline=args.offline or None, files=files)
    except (MissingWeightsError, FileNotFoundError, ValueError) as e:
        logging.getLogger("osediff").error("%s", e)
        return 2


def _precision_line(device: str | None, dtype: str) -> str:
    """`--dry-run`'s account of the device and precision a run would use, and why."""
    import torch

    from osediff.core.pipeline import choose_dtype, default_device

    dev = torch.device(device) if device else default_device()
    choice = choose_dtype(dtype, dev)
    return f"# device {dev}, dtype {choice.name}: {choice.reason}"


def _memory_line(device: str | None, options) -> str:
    """`--dry-run`'s account of the memory limit a run would keep to, and why (`osediff.core.memory`)."""
    import torch

    from osediff.core.memory import choose_budget, free_disk_bytes
    from osediff.core.pipeline import default_device

    dev = torch.device(device) if device else default_device()
    budget = choose_budget(options.max_memory, dev)
    what = "GPU memory" if dev.type == "cuda" else "resident memory of the process"
    return (f"# max memory: {budget} as {what}; what does not fit spills to {options.spill_dir} "
            f"({free_disk_bytes(options.spill_dir) / 1e9:.0f} GB free there)")
