"""`osediff download [base|weights|ram|dape|face|all ...] [--models DIR] [--check] [--force]`: fetch the weights
into the models folder, or (`--check`) say what is on disk: one line per weight, `ok (published)`,
`ok (custom)`, `MISSING` or `BROKEN: <why>`; the exit status is non-zero when anything is missing or broken."""

from __future__ import annotations

import argparse

HELP = "download the weights into the models folder, or --check what is there"
CHOICES = ("base", "weights", "ram", "dape", "face", "all")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="*", metavar="WHAT",
                   help="base, weights, ram, dape, face or all (default: base weights ram dape, what sr needs)")
    p.add_argument("--models", metavar="DIR", help="models folder (default: $OSEDIFF_MODELS or ~/.cache/osediff/models)")
    p.add_argument("--check", action="store_true", help="check the files on disk instead of downloading")
    p.add_argument("--force", action="store_true", help="download again even if the file is already there")
    p.add_argument("--timeout", type=float, help="seconds per connect/read (default: $OSEDIFF_DOWNLOAD_TIMEOUT or 10)")


def _keys(what: list[str]) -> list[str]:
    from osediff.weights.sources import ALL_KEYS, DEFAULT_KEYS

    wrong = [w for w in what if w not in CHOICES]
    if wrong:  # checked here: argparse rejects an empty `nargs="*"` list that has choices
        raise SystemExit(f"osediff download: unknown weight {wrong[0]!r} (choose from {', '.join(CHOICES)})")
    if not what:
        return list(DEFAULT_KEYS)
    return list(ALL_KEYS) if "all" in what else list(dict.fromkeys(what))


def run(args: argparse.Namespace) -> int:
    import logging
    import os
    from pathlib import Path

    if args.models:
        os.environ["OSEDIFF_MODELS"] = str(Path(args.models).expanduser())  # read by locate/obtain
    keys = _keys(args.what)
    if args.check:
        return check_all(keys)
    from osediff.weights.download import DownloadError, download

    log = logging.getLogger("osediff")
    failed = 0
    for key in keys:
        try:
            path = download(key, force=args.force, timeout=args.timeout)
            print(f"{key:8} {path}" + (f" -> {path.resolve()}" if path.is_symlink() else ""))
        except DownloadError as e:
            log.error("%s: %s", key, e)
            failed += 1
    return 1 if failed else 0


def check_all(keys: list[str]) -> int:
    """Print one verdict per weight (the flag/env location when one is set, else the models folder). The base
    is checked first, so the OSEDiff weights can be checked against it (LoRA targets and shapes)."""
    from osediff.weights import check
    from osediff.weights.sources import sources

    src = sources()
    base_dir, bad = None, 0
    for key in sorted(keys, key=lambda k: k != "base"):
        path = _where(key)
        v = check.check(key, path, base=None if key == "base" else base_dir, published_sha1=src[key].blob_sha1)
        if key == "base" and v.ok:
            base_dir = path
        bad += not v.ok
        print(v.line())
    return 1 if bad else 0


def _where(key: str) -> str | None:
    import os

    from osediff.weights import locate

    spec = locate.SPECS[key]
    if os.environ.get(spec.env) and key != "face":
        return os.environ[spec.env]
    for name in spec.names:
        p = locate.models_dir() / name
        if p.exists():
            return str(p)
    if key == "base":  # not in the models folder: what `osediff sr` would use from the Hugging Face cache
        from osediff.weights.hfcache import find_base

        hit = find_base()
        if hit is not None:
            return hit.path
    return str(locate.models_dir() / spec.names[0 if key == "base" else -1])
