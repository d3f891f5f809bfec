"""`osediff` command line: one subcommand per module in `osediff.commands`.

Each command module is light at import time (argparse only); its `run(args) -> int` imports what it needs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from osediff.commands import comfyui, convert, degrade, download, evaluate, sr, train, ui

COMMANDS = {
    "sr": sr,
    "convert": convert,
    "eval": evaluate,
    "train": train,
    "degrade": degrade,
    "download": download,
    "ui": ui,
    "comfyui": comfyui,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osediff", description="One-step diffusion super-resolution (OSEDiff).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(COMMANDS[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
