"""`osediff train --data DIR_OR_LIST [...] --base SD -o RUN`: train OSEDiff (spec §4).

Single process: `osediff train ...`; several GPUs or nodes: `accelerate launch -m osediff train ...` (the
accelerate config chooses the processes; precision is set here with --mixed-precision). The flags come from the
dataclasses in `osediff.train.config`; `--dry-run` prints the resolved configuration and stops.
"""

from __future__ import annotations

import argparse

HELP = "train OSEDiff (LoRA generator + VSD against SD 2.1-base) on accelerate"

_TITLES = {"data": "data and prompts", "model": "networks", "loss": "losses", "optim": "optimisers",
           "run": "run"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from osediff.config import add_dataclass_arguments
    from osediff.train.config import SECTIONS

    parser.add_argument("-o", "--output", required=True, metavar="RUN_DIR",
                        help="run folder: config.json, checkpoints/, logs/, val/")
    for section, cls in SECTIONS.items():
        add_dataclass_arguments(parser.add_argument_group(_TITLES[section]), cls,
                                skip=("output",) if section == "run" else ())
    parser.add_argument("--dry-run", action="store_true", help="print the resolved configuration and stop")


def config_from_args(args: argparse.Namespace, resolve: bool = True):
    """The TrainConfig of the parsed flags; `resolve` finds the base model and RAM weights like `osediff sr`
    (`osediff.weights.obtain`: flag, environment variable, models folder, the Hugging Face cache for the base,
    else a first-use download, then the structural check) and raises MissingWeightsError when they are absent,
    BrokenWeightsError (a ValueError) when they are wrong."""
    import dataclasses

    from osediff.config import dataclass_from_args
    from osediff.train.config import SECTIONS, TrainConfig
    from osediff.weights import locate as weights
    from osediff.weights.obtain import obtain

    parts = {name: dataclass_from_args(cls, args) for name, cls in SECTIONS.items()}
    model, data = parts["model"], parts["data"]
    # resolving: as `osediff sr` does (flag/env, models folder, Hugging Face cache, first-use download, the
    # structural check); a dry run only looks (no download, no check)
    find = obtain if resolve else (lambda key, given: weights.find(key, given, required=False))
    base = find("base", model.base)
    parts["model"] = dataclasses.replace(model, base=base or model.base)
    if data.prompts == "ram":
        ram = find("ram", data.ram)
        parts["data"] = dataclasses.replace(data, ram=ram or data.ram)
    return TrainConfig(**parts)


def run(args: argparse.Namespace) -> int:
    import logging

    from osediff.config import to_json
    from osediff.weights.locate import MissingWeightsError

    logger = logging.getLogger("osediff.train")
    if not getattr(args, "verbose", False):  # accelerate reports every file of every checkpoint at INFO
        logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        cfg = config_from_args(args, resolve=not args.dry_run)
    except (ValueError, MissingWeightsError) as e:
        logger.error("%s", e)
        return 2
    if args.dry_run:
        print(to_json(cfg))
        return 0
    from osediff.train.loop import Trainer

    try:  # configuration problems found while building (crop too small, missing files): a message, not a trace
        trainer = Trainer(cfg)
        if cfg.run.resume:
            trainer.resume(cfg.run.resume)
    except (ValueError, FileNotFoundError, ImportError) as e:
        logger.error("%s", e, exc_info=getattr(args, "verbose", False))
        return 2
    trainer.fit()
    return 0
