"""The `osediff` subcommands, one module each (`sr`, `convert`, `eval`, `train`, `degrade`): a front-end.

Each module has `HELP`, `add_arguments(parser)` (argparse only, so `osediff --help` imports no torch) and
`run(args) -> int`, which imports the library parts it calls; none re-implements a step of the library.
"""
