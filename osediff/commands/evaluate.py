"""`osediff eval`: score SR images against HR by name with the authors' protocol (spec §5), or first
super-resolve an LR folder and then score it (reproduce a paper table).

    osediff eval --sr results/ --hr HR/ [--lr LR/] [--metrics psnr,ssim,lpips,...|all] [--compare other/]
    osediff eval --lr LR/ --hr HR/ --base sd21/ --weights osediff.safetensors [--metrics all]

Writes into --out (default ./eval_<SR or LR folder name>): per_image.csv, summary.json, report.html,
and the SR images under sr/ when it ran SR. Exit status: 0 all asked metrics computed; 1 the folders do
not pair (nothing is averaged) or SR failed; 2 bad options; 3 PSNR/SSIM computed but some learned
metric could not be (its backend or weights missing; the reason is logged and in summary.json).
"""

from __future__ import annotations

import argparse
import logging

HELP = "evaluate SR images against HR (PSNR/SSIM/NIQE in-house, learned metrics via a backend), or run SR then evaluate"

EPILOG = """metric implementations and licences:
  psnr, ssim, niqe  in-house (osediff, Apache-2.0; NIQE's pristine model from basicsr 1.4.2, Apache-2.0):
                    the authors' numbers, reproduced to the last logged digit; no optional dependency
  --backend pyiqa (default): lpips, dists, musiq, maniqa, clipiqa, fid through pyiqa, as the authors (the
                    paper's numbers). pyiqa is NON-COMMERCIAL: 0.1.10 (the authors' pin) is CC BY-NC-SA 4.0 +
                    NTU S-Lab License 1.0, >= 0.1.16 is PolyForm Noncommercial 1.0. pip install 'osediff[eval]'
  --backend permissive: lpips = LPIPS-VGG in-house (Apache-2.0; VGG, not the paper's AlexNet LPIPS: not
                    comparable), dists = DISTS_pytorch (MIT, the DISTS authors' package that pyiqa
                    ports: expected to agree, not verified), clipiqa and fid = torchmetrics (Apache-2.0; not
                    comparable with pyiqa's). musiq and maniqa: pyiqa only.
                    pip install 'osediff[eval-permissive]'
summary.json ("implementations") and report.html state, per metric, the backend, licence and comparability."""

log = logging.getLogger("osediff.eval")

EXIT_PAIRING, EXIT_USAGE, EXIT_PARTIAL = 1, 2, 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG  # the licence facts, laid out as written
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    io = parser.add_argument_group("folders")
    io.add_argument("--sr", metavar="DIR", help="SR images to score (omit it and give --base/--weights to run SR)")
    io.add_argument("--hr", metavar="DIR", required=True, help="ground-truth images, paired with SR by file name")
    io.add_argument("--lr", metavar="DIR", help="LR inputs: shown in the report; the SR inputs in reproduce mode")
    io.add_argument("--compare", metavar="DIR", help="a second SR folder scored alongside (e.g. the authors')")
    io.add_argument("--out", metavar="DIR",
                    help="output folder (default: ./eval_<SR folder name>; ./eval_<LR folder name> when running SR)")

    m = parser.add_argument_group("metrics")
    m.add_argument("--metrics", default="psnr,ssim",
                   help="comma list of psnr,ssim,niqe,lpips,dists,musiq,maniqa,clipiqa,fid, or 'all' "
                        "(default: %(default)s); psnr, ssim, niqe are in-house, the others need --backend")
    m.add_argument("--backend", choices=("pyiqa", "permissive"), default="pyiqa",
                   help="implementation of the learned metrics: pyiqa (the paper's numbers, non-commercial "
                        "licence) or permissive (see below) (default: %(default)s)")
    m.add_argument("--lpips-vgg", metavar="FILE", help="--backend permissive LPIPS: torchvision vgg16-397923af.pth "
                                                       "(or OSEDIFF_LPIPS_VGG, the models folder, the torch hub cache)")
    m.add_argument("--lpips-lin", metavar="FILE", help="--backend permissive LPIPS: lpips v0.1 vgg.pth heads "
                                                       "(or OSEDIFF_LPIPS_LIN, the models folder, the torch hub cache)")
    m.add_argument("--device", help="torch device for the learned metrics and for SR (default: cuda if available)")
    m.add_argument("--seed", type=int, default=0, help="seed before each learned metric call (MANIQA's "
                                                       "random crops) (default: %(default)s)")

    sr = parser.add_argument_group("reproduce mode (run SR on --lr first, into <out>/sr)")
    sr.add_argument("--base", metavar="DIR", help="Stable Diffusion 2.1-base folder")
    sr.add_argument("--weights", metavar="FILE", help="OSEDiff weights (osediff.pkl or converted safetensors)")
    sr.add_argument("--dape", metavar="FILE", help="DAPE weights (prompt extractor)")
    sr.add_argument("--ram", metavar="FILE", help="RAM weights")
    sr.add_argument("--dtype", help="SR dtype, e.g. fp16, bf16, fp32")

    r = parser.add_argument_group("output")
    r.add_argument("--no-report", dest="report", action="store_false", help="skip report.html")
    r.add_argument("--top-k", type=int, default=2, help="best and worst images shown per metric (default: %(default)s)")
    r.add_argument("--crop", type=int, default=128, help="crop size in HR pixels for the report (default: %(default)s)")
    r.add_argument("-q", "--quiet", action="store_true", help="print only the means, not one row per image")
    r.add_argument("--dry-run", action="store_true", help="print the resolved options and the pairing, then stop")


def _resolve(args: argparse.Namespace) -> tuple[dict, str | None]:
    """The options as a plain dict (written to summary.json), or an error message."""
    from pathlib import Path

    from osediff.evaluation.evaluate import parse_metrics

    reproduce = args.sr is None
    if reproduce and not (args.lr and args.base and args.weights):
        return {}, "give --sr DIR, or --lr DIR with --base and --weights to run SR first"
    if not reproduce and (args.base or args.weights):
        return {}, "--base/--weights run SR into <out>/sr; they cannot be combined with --sr"
    try:
        metrics = parse_metrics(args.metrics)
    except ValueError as e:
        return {}, str(e)
    if args.top_k < 0 or args.crop < 1:
        return {}, "--top-k must be >= 0 and --crop >= 1"
    out = Path(args.out or f"eval_{Path(args.sr or args.lr).resolve().name}")
    cfg = {k: v for k, v in vars(args).items() if k not in ("func", "command", "verbose")}
    cfg.update(metrics=list(metrics), out=str(out), mode="reproduce" if reproduce else "score",
               sr=str(out / "sr") if reproduce else args.sr)
    return cfg, None


def _run_sr(cfg: dict) -> int:
    """Reproduce mode: super-resolve every image of --lr into <out>/sr with the inference pipeline."""
    import time

    from osediff.evaluation.evaluate import list_images

    try:
        from osediff.core.batch import super_resolve_files
    except ImportError as e:
        log.error("cannot run SR: osediff.core.batch.super_resolve_files is not available (%s)", e)
        return EXIT_PAIRING
    inputs = [str(p) for p in list_images(cfg["lr"]).values()]
    if not inputs:
        log.error("no images in the LR folder %s", cfg["lr"])
        return EXIT_PAIRING
    log.info("super-resolving %d images from %s into %s", len(inputs), cfg["lr"], cfg["sr"])
    t = time.perf_counter()
    rc = super_resolve_files(inputs, cfg["sr"], base=cfg["base"], weights=cfg["weights"], dape=cfg["dape"],
                             ram=cfg["ram"], device=cfg["device"], dtype=cfg["dtype"])
    cfg["sr_seconds"] = round(time.perf_counter() - t, 3)
    if rc:
        log.error("SR failed with exit status %d; nothing evaluated", rc)
    return int(rc)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from osediff.evaluation.evaluate import (
        PairingError,
        evaluate,
        format_table,
        pair_images,
        write_per_image_csv,
        write_summary_json,
    )

    # 1. resolve options
    cfg, error = _resolve(args)
    if error:
        log.error("%s", error)
        return EXIT_USAGE
    out = Path(cfg["out"])
    sr_dirs = [cfg["sr"]] + ([cfg["compare"]] if cfg["compare"] else [])
    if args.dry_run:
        print(json.dumps(cfg, indent=2, default=str))
        if cfg["mode"] == "score":
            try:
                for d in sr_dirs:
                    print(f"{d}: {len(pair_images(d, cfg['hr'], cfg['lr']))} pairs with {cfg['hr']}")
            except PairingError as e:
                log.error("%s", e)
                return EXIT_PAIRING
        return 0
    out.mkdir(parents=True, exist_ok=True)

    # 2. reproduce mode: SR first
    if cfg["mode"] == "reproduce" and (rc := _run_sr(cfg)):
        return rc

    # 3. score
    try:
        ev = evaluate(sr_dirs, cfg["hr"], cfg["metrics"], lr_dir=cfg["lr"], device=cfg["device"],
                      seed=cfg["seed"], backend=cfg["backend"],
                      weights={"lpips_vgg": cfg["lpips_vgg"], "lpips_lin": cfg["lpips_lin"]})
    except PairingError as e:
        log.error("%s\nNothing was averaged: fix the folders (files are paired by name).", e)
        return EXIT_PAIRING
    if "sr_seconds" in cfg:
        ev.seconds["sr"] = cfg["sr_seconds"]

    # 4. write: table, csv, report, then summary.json (last, so it holds the report's time too)
    print(format_table(ev, per_image=not args.quiet))
    write_per_image_csv(ev, out / "per_image.csv")
    if args.report:
        import time

        from osediff.evaluation.report import write_report

        t = time.perf_counter()
        write_report(ev, out / "report.html", top_k=args.top_k, crop=args.crop)
        ev.seconds["report"] = time.perf_counter() - t
    write_summary_json(ev, out / "summary.json", cfg)
    log.info("wrote per_image.csv, summary.json%s into %s", ", report.html" if args.report else "", out)
    if ev.unavailable:
        log.error("not computed: %s (see the messages above; the in-house metrics are complete)",
                  ", ".join(ev.unavailable))
        return EXIT_PARTIAL
    return 0
