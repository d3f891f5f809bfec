"""`osediff convert SRC DST`: the authors' osediff.pkl <-> our safetensors (format by DST's suffix)."""

from __future__ import annotations

import argparse

HELP = "convert osediff.pkl to .safetensors (or back)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="osediff.pkl (authors' format) or osediff .safetensors")
    p.add_argument("dst", help="output: *.safetensors for our format, anything else for the authors' pkl")


def run(args: argparse.Namespace) -> int:
    from osediff.core.checkpoint import convert

    w = convert(args.src, args.dst)
    n = sum(v.numel() for v in [*w.unet_state.values(), *w.vae_state.values()])
    print(f"{args.src} -> {args.dst}: {len(w.unet_state)} UNet + {len(w.vae_state)} VAE tensors, {n:,} numbers, "
          f"ranks {w.rank_unet}/{w.rank_vae}")
    return 0
