"""`osediff train` (placeholder until its module lands)."""

HELP = "not yet available"


def add_arguments(parser):
    pass


def run(args) -> int:
    raise SystemExit("osediff train: not yet available")
