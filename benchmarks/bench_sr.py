"""Speed and memory of the real OSEDiff pipeline on the full-size SD 2.1-base architecture (random weights).

Weights do not change speed, so nothing is downloaded: the UNet, VAE and CLIP text encoder are built with the
SD 2.1-base configs and random values, and a random OSEDiff LoRA (rank 4, all 258 + 32 targets) is merged in
(or kept as peft adapters with `--variants unmerged`, the reference's structure). Each configuration runs
the whole pipeline on a (1,3,H/4,W/4) tensor: bicubic ×4, pad, VAE encode, UNet at t=999, decode, AdaIN.

    python benchmarks/bench_sr.py --device cpu --dtypes fp32,bf16 --sizes 512 --variants unmerged,merged
    python benchmarks/bench_sr.py --device cuda --dtypes bf16,fp16 --sizes 512,1024,2048,4096

Prints one row per configuration: median seconds per image over --runs after --warmup, peak memory (CUDA: max
allocated; CPU: peak RSS of a fresh process per configuration), FLOPs per stage (torch's flop counter) and
the achieved TFLOP/s. `--tiny` swaps in the tiny test architecture (a smoke test of this script).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_model(device: str, dtype: torch.dtype, variant: str, tiny: bool = False, seed: int = 0):
    """The OSEDiff generator at full size with random weights (+ random LoRA, merged or as peft adapters)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from osediff import testing
    from osediff.core import lora
    from osediff.core.build import apply_weights
    from osediff.core.checkpoint import OSEDiffWeights
    from osediff.core.model import OSEDiffModel

    torch.manual_seed(seed)
    unet_cfg, vae_cfg, text_cfg = ((testing.TINY_UNET, testing.TINY_VAE, testing.TINY_TEXT) if tiny else
                                   (testing.SD21_UNET, testing.SD21_VAE, testing.SD21_TEXT))
    tok_dir = Path(tempfile.mkdtemp())
    vocab = testing.write_tiny_tokenizer(tok_dir)  # tokenising costs microseconds; its size does not matter
    build_dev = device if device != "mps" else "cpu"
    with torch.device(build_dev):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab if tiny else 49408, **text_cfg))
    targets, vae_targets = lora.unet_lora_targets(unet), lora.vae_lora_targets(vae)
    g = torch.Generator().manual_seed(seed)

    def pair(model, name, adapter, rank=4):
        w = model.get_submodule(name).weight
        a = torch.randn((rank, *w.shape[1:]), generator=g) / rank
        b = torch.randn((w.shape[0], rank, *([1, 1] if w.ndim == 4 else [])), generator=g) * 1e-3
        return {f"{name}.lora_A.{adapter}.weight": a, f"{name}.lora_B.{adapter}.weight": b}

    unet_state = {"conv_in.base_layer.weight": unet.conv_in.weight.detach().cpu().clone(),
                  "conv_in.base_layer.bias": unet.conv_in.bias.detach().cpu().clone()}
    for adapter, names in targets.items():
        for n in names:
            unet_state.update(pair(unet, n, adapter))
    vae_state = {}
    for n in lora.unique(vae_targets):
        vae_state.update(pair(vae, n, lora.VAE_ADAPTER))
    w = OSEDiffWeights(targets, vae_targets, 4, 4, unet_state, vae_state)
    apply_weights(unet, vae, w, merge=(variant != "unmerged"))
    model = OSEDiffModel(unet, vae, text, CLIPTokenizer.from_pretrained(str(tok_dir)))
    return model.to(device=device, dtype=dtype)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def stage_flops(model, x, opts) -> dict[str, float]:
    """FLOPs of encode / UNet / decode for one image, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    with torch.inference_mode():
        xp = torch.nn.functional.interpolate(x, scale_factor=4) * 2 - 1
        c = model.encode_text([", ,"])
        with FlopCounterMode(display=False) as fc:
            z = model.encode(xp, tile=opts.vae_encoder_tile, tile_batch=opts.tile_batch)
        out["encode"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            z0 = model.denoise(z, c, tile=opts.tile, overlap=opts.tile_overlap, tile_batch=opts.tile_batch)
        out["unet"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            model.decode(z0, tile=opts.vae_decoder_tile, tile_batch=opts.tile_batch)
        out["decode"] = fc.get_total_flops()
    return out


def run_one(cfg: dict) -> dict:
    from osediff.core.pipeline import OSEDiffPipeline, SROptions, resolve_dtypes
    from osediff.tiling.latent import tile_grid

    device = cfg["device"]
    dtype, vae_dtype = resolve_dtypes(cfg["dtype"], torch.device(device))
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    model = build_model(device, dtype, cfg["variant"], cfg["tiny"])
    model.vae.to(vae_dtype)
    model.optimize(channels_last=cfg["channels_last"], compile=bool(cfg["compile"]),
                   compile_mode=cfg["compile"] if isinstance(cfg["compile"], str) else None)
    build_s = time.perf_counter() - t0
    opts = SROptions(tile_batch=cfg["tile_batch"], vae_offload=cfg.get("vae_offload", False))
    pipe = OSEDiffPipeline(model, None, opts)
    if cfg["dape"]:
        from osediff.dape import RAMConfig, RAMTagger

        pipe.extractor = RAMTagger(RAMConfig()).to(device=device, dtype=dtype).eval()
    s = cfg["size"]
    x = torch.rand(cfg.get("batch", 1), 3, s // 4, s // 4, generator=torch.Generator().manual_seed(1)).to(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    out = None
    for i in range(cfg["warmup"] + cfg["runs"]):
        sync(device)
        t = time.perf_counter()
        out = pipe(x)
        sync(device)
        if i >= cfg["warmup"]:
            times.append(time.perf_counter() - t)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    lat = s // 8
    th, tw, origins = tile_grid(lat, lat, opts.tile, opts.tile_overlap)
    flops = stage_flops(model, x, opts) if cfg["flops"] and not cfg["compile"] else {}
    med = statistics.median(times)
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else None
    res = dict(cfg, gpu=gpu, median_s=med, images_per_s=cfg.get("batch", 1) / med, times=times, peak_gib=peak,
               build_s=build_s, latent_tiles=len(origins),
               vae_dec_tiled=lat > opts.vae_decoder_tile + 22, flops=flops,
               tflops=(sum(flops.values()) / med / 1e12) if flops else None)
    if cfg.get("save"):
        torch.save(out.cpu(), cfg["save"])
    return res


def fmt(r: dict) -> str:
    fl = r["flops"]
    stages = "/".join(f"{fl[k] / 1e12:.2f}" for k in ("encode", "unet", "decode")) if fl else "-"
    tf = f"{r['tflops']:.1f}" if r["tflops"] else "-"
    tiling = f"{r['latent_tiles']}{'+vae' if r['vae_dec_tiled'] else ''}"
    comp = f"+compile({r['compile']})" if isinstance(r["compile"], str) else "+compile" if r["compile"] else ""
    variant = r["variant"] + ("+cl" if r["channels_last"] else "") + comp + ("+dape" if r["dape"] else "") + (
        "+offload" if r.get("vae_offload") else "") + (f" ×{r['batch']}" if r.get("batch", 1) > 1 else "")
    return (f"| {r['device']} | {r['dtype']} | {variant} | {r['size'] // 4}² → {r['size']}² | {tiling} | "
            f"{r['tile_batch']} | {r['median_s'] * 1000:.1f} | {r['peak_gib']:.2f} | {stages} | {tf} |")


HEADER = ("| device | dtype | variant | input → output | latent tiles | tile batch | median ms | peak GiB | "
          "TFLOP enc/unet/dec | TFLOP/s |\n|---|---|---|---|---|---|---|---|---|---|")


COMPILE = {"none": False, "default": True}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of the first image of each batch (batches of different sizes compare too)."""
    mse = torch.mean((a[:1].float() - b[:1].float()) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--sizes", default="512", help="output sizes (square), comma separated")
    p.add_argument("--variants", default="merged", help="merged and/or unmerged (peft adapters, as the reference)")
    p.add_argument("--tile-batch", default="4")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", default="none",
                   help="torch.compile modes, comma separated: none, default, reduce-overhead, max-autotune")
    p.add_argument("--batch", default="1", help="images per call, comma separated (throughput)")
    p.add_argument("--vae-offload", action="store_true")
    p.add_argument("--dape", action="store_true", help="include the full-size RAM/DAPE tagger")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-flops", dest="flops", action="store_false")
    p.add_argument("--tiny", action="store_true", help="tiny architecture: a smoke test of this script")
    p.add_argument("--json", help="append one JSON line per configuration to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)  # run one configuration (JSON) in this process
    a = p.parse_args()
    if a.one:
        print("RESULT " + json.dumps(run_one(json.loads(a.one))), flush=True)
        return
    configs = [dict(device=a.device, dtype=dt, size=int(s), variant=v, tile_batch=int(tb),
                    channels_last=a.channels_last, compile=COMPILE[c] if c in COMPILE else c, dape=a.dape, runs=a.runs, warmup=a.warmup,
                    flops=a.flops, tiny=a.tiny, batch=int(b), vae_offload=a.vae_offload)
               for dt in a.dtypes.split(",") for s in a.sizes.split(",") for v in a.variants.split(",")
               for tb in a.tile_batch.split(",") for b in a.batch.split(",") for c in a.compile.split(",")]
    print(f"# {torch.__version__}, {a.device}: "
          + (torch.cuda.get_device_name() if a.device.startswith("cuda") else f"{os.cpu_count()} CPU threads"))
    print(HEADER, flush=True)
    results = []
    outputs = {}
    for cfg in configs:
        # a fresh process per configuration: clean peak RSS, no allocator or compile state carried over
        save = tempfile.mktemp(suffix=".pt")
        cfg["save"] = save
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"| {cfg['device']} | {cfg['dtype']} | {cfg['variant']} | {cfg['size']} | FAILED: "
                  f"{(proc.stderr.strip().splitlines() or ['?'])[-1][:150]} |", flush=True)
            continue
        r = json.loads(line[0][7:])
        results.append(r)
        outputs[(r["dtype"], r["size"], r["variant"], r["tile_batch"], r["batch"], str(r["compile"]))] = save
        print(fmt(r), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    # same function check: every output against the first fp32 (else first) output of the same size
    for s in {r["size"] for r in results}:
        keys = [k for k in outputs if k[1] == s]
        ref = next((k for k in keys if k[0] == "fp32" and k[2] == "unmerged"),
                   next((k for k in keys if k[0] == "fp32"), keys[0]))
        base = torch.load(outputs[ref])
        for k in keys:
            if k != ref:
                print(f"PSNR {k} vs {ref}: {psnr(torch.load(outputs[k]), base):.1f} dB")
    for path in outputs.values():
        Path(path).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
