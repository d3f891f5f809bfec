"""`--dtype auto` (a pure function of the device and the CPU's flags) and the fp16/bf16 safety net that reruns
an image in fp32 when the UNet or the decoder produced inf/NaN (overflow injected on the CPU)."""

import logging

import pytest
import torch

from osediff.core import precision
from osediff.core.precision import choose_dtype, parse_cpu_flags

# /proc/cpuinfo excerpts: a Sapphire Rapids Xeon (AMX), a Skylake-SP Xeon (AVX-512 without BF16), an AMD Zen 4
# EPYC (AVX512-BF16, no AMX), an older desktop (AVX2 only) and an ARM server (Features line)
SPR = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8\n"
SKX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni\n"
ZEN4 = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\nbugs\t\t: sysret_ss_attrs\n"
AVX2 = "flags\t\t: fpu sse2 avx avx2 fma\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16 i8mm\n"


def test_cpu_flags_are_parsed_from_cpuinfo_text():
    assert {"avx512_bf16", "amx_bf16", "avx512f"} <= parse_cpu_flags(SPR)
    assert "sysret_ss_attrs" not in parse_cpu_flags(ZEN4)  # "bugs" is not a flags line
    assert "bf16" in parse_cpu_flags(ARM)
    assert parse_cpu_flags("model name\t: something\n") == frozenset()


def test_auto_picks_bf16_only_where_the_cpu_has_it_natively():
    assert choose_dtype("auto", "cpu", parse_cpu_flags(SPR)).name == "bf16"
    assert choose_dtype(None, "cpu", parse_cpu_flags(ZEN4)).name == "bf16"
    skx = choose_dtype("auto", "cpu", parse_cpu_flags(SKX))  # AVX-512 alone emulates bf16: 3.5x slower
    assert skx.name == "fp32" and "no native bf16" in skx.reason and not skx.emulated_bf16
    assert choose_dtype("auto", "cpu", parse_cpu_flags(AVX2)).name == "fp32"
    assert choose_dtype("auto", "cpu", parse_cpu_flags(ARM)).name == "fp32"  # unmeasured there: the safe pick
    assert choose_dtype("auto", "cpu", None).name == "fp32"  # features unknown
    assert "amx_bf16" in choose_dtype("auto", "cpu", parse_cpu_flags(SPR)).reason


def test_auto_on_gpus_keeps_fp16_and_explicit_choices_are_kept():
    assert choose_dtype("auto", "cuda").name == "fp16" and choose_dtype("auto", "mps").name == "fp16"
    for name in ("fp32", "fp16", "bf16", "vae-bf16"):
        assert choose_dtype(name, "cpu", parse_cpu_flags(SPR)).name == name
        assert choose_dtype(name, "cuda").warning is None
    with pytest.raises(ValueError, match="--dtype"):
        choose_dtype("int8", "cpu", None)


def test_forced_bf16_on_an_emulating_cpu_warns():
    for name in ("bf16", "vae-bf16"):
        c = choose_dtype(name, "cpu", parse_cpu_flags(SKX))
        assert c.emulated_bf16 and "emulated" in c.warning and c.name == name
    assert choose_dtype("bf16", "cpu", parse_cpu_flags(SPR)).warning is None
    assert choose_dtype("fp32", "cpu", parse_cpu_flags(SKX)).warning is None


def test_pipeline_warns_once_per_process(monkeypatch, caplog):
    from osediff.core import pipeline

    monkeypatch.setattr(pipeline, "cpu_flags", lambda: parse_cpu_flags(SKX))
    monkeypatch.setattr(pipeline, "_warned_emulated_bf16", False)
    with caplog.at_level(logging.WARNING):
        assert pipeline.resolve_dtypes("bf16", torch.device("cpu")) == (torch.bfloat16, torch.bfloat16)
        assert pipeline.resolve_dtypes("vae-bf16", torch.device("cpu")) == (torch.float32, torch.bfloat16)
        assert pipeline.resolve_dtypes(None, torch.device("cpu")) == (torch.float32, torch.float32)
    assert caplog.text.count("emulated") == 1
    monkeypatch.setattr(pipeline, "cpu_flags", lambda: parse_cpu_flags(SPR))
    assert pipeline.default_dtype(torch.device("cpu")) == torch.bfloat16
    assert pipeline.default_dtype(torch.device("cuda")) == torch.float16


def test_this_machine_reads_its_flags():
    from osediff.core.pipeline import cpu_flags

    flags = cpu_flags()
    assert flags is None or "fpu" in flags or "fp" in flags or precision.native_bf16(flags) is not None


# --- fp16 safety ------------------------------------------------------------------------------------------
def _fp16_pipe(tiny_sd, tiny_ckpt, **opts):
    from osediff.core.options import SROptions
    from osediff.core.pipeline import OSEDiffPipeline

    return OSEDiffPipeline.from_pretrained(str(tiny_sd), str(tiny_ckpt), device="cpu", dtype="fp16",
                                           use_dape=False, options=SROptions(**opts))


def _inject_inf(monkeypatch, module, *, index=0, unet=True):
    """Overflow the way fp16 overflows, deterministically: the input seen first at batch element `index` makes
    every fp16 forward of `module` (a module, or a class) that sees it again put +inf into its output; fp32
    forwards are left alone."""
    orig = module.forward
    poisoned = []

    def forward(*args, **kwargs):
        out = orig(*args, **kwargs)
        inp = args[1] if isinstance(module, type) else args[0]
        if inp.dtype != torch.float16:
            return out
        if not poisoned:
            poisoned.append(inp[index].clone())
        for k in range(inp.shape[0]):
            if inp[k].shape == poisoned[0].shape and torch.equal(inp[k], poisoned[0]):
                (out.sample if unet else out)[k] = float("inf")
        return out

    monkeypatch.setattr(module, "forward", forward)


def test_unet_overflow_reruns_the_image_with_the_unet_in_fp32(tiny_sd, tiny_ckpt, monkeypatch, caplog):
    pipe = _fp16_pipe(tiny_sd, tiny_ckpt)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = pipe(x)
    weights = {k: v.clone() for k, v in pipe.model.unet.state_dict().items()}
    _inject_inf(monkeypatch, pipe.model.unet)
    with caplog.at_level(logging.WARNING):
        y = pipe(x)
    assert torch.isfinite(y).all() and "non-finite values after the UNet" in caplog.text
    assert pipe.model.reruns == {"images": 1, "unet_tiles": 1}
    # the UNet is back in fp16, bit for bit, and the rerun equals a run with the UNet in fp32 throughout
    assert all(torch.equal(weights[k], v) for k, v in pipe.model.unet.state_dict().items())
    assert pipe.model.unet.dtype == torch.float16
    monkeypatch.undo()
    pipe.model.unet.float()
    assert torch.equal(y, pipe(x)) and not torch.equal(y, plain)


def test_decoder_overflow_reruns_the_decoder_in_fp32(tiny_sd, tiny_ckpt, monkeypatch):
    model = _fp16_pipe(tiny_sd, tiny_ckpt).model
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    c = model.encode_text([""])
    _inject_inf(monkeypatch, model.vae.decoder, unet=False)
    y = model(x, c)
    assert torch.isfinite(y).all() and model.reruns == {"images": 1, "decoder": 1}
    assert model.vae.decoder.conv_out.weight.dtype == torch.float16 and y.dtype == torch.float16
    monkeypatch.undo()
    model.vae.decoder.float()
    model.vae.post_quant_conv.float()
    assert torch.equal(y, model(x, c).half())  # the fp32 decoder's image, stored in the run's dtype


def test_only_the_overflowing_image_and_tile_are_rerun(tiny_sd, tiny_ckpt, monkeypatch):
    pipe = _fp16_pipe(tiny_sd, tiny_ckpt, tile=8, tile_overlap=4)  # 24² -> 96² image, a 12² latent: 4 tiles
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    plain = pipe(x)
    _inject_inf(monkeypatch, pipe.model.unet, index=1)  # the first tile of the second image overflows
    y = pipe(x)
    assert pipe.model.reruns == {"images": 1, "unet_tiles": 1}
    assert torch.equal(y[0], plain[0])  # the other image is untouched
    assert torch.isfinite(y[1]).all() and (y[1] - plain[1]).abs().mean() < 0.02  # fp32 tile vs fp16: close


def test_fp32_runs_skip_the_check(tiny_pipe, monkeypatch):
    calls = []
    monkeypatch.setattr(type(tiny_pipe.model), "_rerun_nonfinite", lambda *a: calls.append(1))
    tiny_pipe(torch.rand(1, 3, 16, 16))
    assert calls == []


def test_the_run_summary_counts_reruns(tiny_sd, tiny_ckpt, tmp_path, monkeypatch, caplog):
    import numpy as np
    from diffusers import UNet2DConditionModel
    from PIL import Image

    from osediff.cli import main

    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
    _inject_inf(monkeypatch, UNet2DConditionModel)  # the class: the CLI builds its own model
    with caplog.at_level(logging.INFO):
        rc = main(["sr", str(tmp_path), "-o", str(tmp_path / "out"), "--base", str(tiny_sd), "--weights",
                   str(tiny_ckpt), "--no-dape", "--device", "cpu", "--dtype", "fp16", "--process-size", "32"])
    assert rc == 0 and "2 written, 0 skipped (existing), 0 failed, 1 rerun in fp32" in caplog.text
