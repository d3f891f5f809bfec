"""`osediff ui`: the web page (Gradio, `pip install "osediff[ui]"`), on 127.0.0.1:7860 by default."""

from __future__ import annotations

import argparse
import logging

HELP = "a web page to upscale, compare and steer (Gradio; pip install 'osediff[ui]')"

log = logging.getLogger("osediff.ui")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from osediff.commands.sr import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only; see README for an SSH "
                        "tunnel instead of 0.0.0.0)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--share", action="store_true", help="also publish a public Gradio link (anyone can use it)")
    p.add_argument("--max-megapixels", type=float, default=2.0,
                   help="largest input the page accepts, in megapixels (default: %(default)s)")
    p.add_argument("--max-file-mb", type=float, default=50.0, help="upload size limit in MB (default: %(default)s)")
    p.add_argument("--max-memory", type=float, metavar="GIB",
                   help="GiB a job may use (GPU memory, or the process's RAM on a CPU); beyond it tile states spill "
                        "to --spill-dir, same output bit for bit (default: auto from the free memory; 0 = no limit)")
    p.add_argument("--spill-dir", help="folder for spilled state (default: the temporary folder)")
    p.add_argument("--examples", metavar="DIR",
                   help="example images (default: ../shared/benchmarks/realsr/LR when it exists)")


def exposure_warnings(host: str, share: bool) -> list[str]:
    """What to tell the user when the page is reachable beyond this machine."""
    out = []
    if host not in ("127.0.0.1", "localhost", "::1"):
        out.append(f"listening on {host}: anyone who can reach this machine can use the page and its device "
                   "(an SSH tunnel to 127.0.0.1 is safer: see README)")
    if share:
        out.append("--share publishes a public link: anyone with it can upload images and use your device")
    return out


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local tool does not phone home unasked
    try:
        import gradio  # noqa: F401
    except ImportError:
        log.error("osediff ui needs Gradio: pip install \"osediff[ui]\"")
        return 2
    from osediff.core.options import SROptions
    from osediff.core.pipeline import OSEDiffPipeline
    from osediff.ui.app import build_app, find_examples
    from osediff.ui.jobs import Runner
    from osediff.weights.locate import MissingWeightsError

    try:  # weight problems are reported here, before any server starts
        pipe = OSEDiffPipeline.from_pretrained(args.base, args.weights, device=args.device, dtype=args.dtype,
                                               ram=args.ram, dape=args.dape, use_dape=args.use_dape,
                                               merge=args.merge, offline=args.offline or None,
                                               options=SROptions(max_memory=args.max_memory, spill_dir=args.spill_dir))
    except (MissingWeightsError, FileNotFoundError, ValueError) as e:  # missing, or broken (one line)
        log.error("%s", e)
        return 2
    for w in exposure_warnings(args.host, args.share):
        log.warning("%s", w)
    examples = find_examples(args.examples or Path("../shared/benchmarks/realsr/LR"))
    app = build_app(Runner(pipe, max_megapixels=args.max_megapixels), examples=examples,
                    max_file_mb=args.max_file_mb)
    app.launch(server_name=args.host, server_port=args.port, share=args.share,
               max_file_size=f"{args.max_file_mb:g}mb", allowed_paths=examples)
    return 0
