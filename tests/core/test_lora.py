"""LoRA targets against the spec's Appendix A (full-size SD 2.1-base built on the meta device, no weights),
and the merge math: merged weights compute what peft's unmerged adapters compute."""

import json
import re

import pytest
import torch
from conftest import SHARED

from osediff.core import lora

SPEC = SHARED / "spec" / "osediff.md"


def _appendix_lists() -> dict[str, list[tuple[str, str, str]]]:
    text = SPEC.read_text()
    out = {}
    for key, header in [("vae", "### A.1b"), ("default_encoder", "### A.2"), ("default_decoder", "### A.3"),
                        ("default_others", "### A.4")]:
        block = text[text.index(header):].split("```")[1]
        out[key] = re.findall(r"^(\S+)\s+A=(\S+)\s+B=(\S+)$", block, flags=re.M)
    raw = text[text.index("### A.1 "):].split("```")[1]
    out["vae_raw"] = json.loads(raw.strip())
    return out


@pytest.fixture(scope="module")
def full_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from osediff.testing import SD21_UNET, SD21_VAE

    with torch.device("meta"):
        return UNet2DConditionModel(**SD21_UNET), AutoencoderKL(**SD21_VAE)


def _shapes(module, rank=4):
    w = module.weight
    if w.ndim == 2:
        return f"{rank}x{w.shape[1]}", f"{w.shape[0]}x{rank}"
    k = "x".join(map(str, w.shape[2:]))
    return f"{rank}x{w.shape[1]}x{k}", f"{w.shape[0]}x{rank}x1x1"


def test_full_size_parameter_counts(full_models):
    unet, vae = full_models
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863


def test_unet_targets_equal_appendix_a(full_models):
    unet, _ = full_models
    spec = _appendix_lists()
    ours = lora.unet_lora_targets(unet)
    counts = {"default_encoder": (94, 1_253_776), "default_decoder": (148, 2_425_104), "default_others": (16, 376_832)}
    for adapter, (n, params) in counts.items():
        assert ours[adapter] == [name for name, _, _ in spec[adapter]]
        assert len(ours[adapter]) == n
        got = [(name, *_shapes(unet.get_submodule(name))) for name in ours[adapter]]
        assert got == spec[adapter]
        # A is r × (in·k·k), B is out × r
        numel = sum(4 * (unet.get_submodule(m).weight[0].numel() + unet.get_submodule(m).weight.shape[0])
                    for m in ours[adapter])
        assert numel == params


def test_vae_targets_equal_appendix_a(full_models):
    _, vae = full_models
    spec = _appendix_lists()
    raw = lora.vae_lora_targets(vae)
    assert raw == spec["vae_raw"] and len(raw) == 65
    uniq = lora.unique(raw)
    assert len(uniq) == 32
    assert [(n, *_shapes(vae.get_submodule(n))) for n in uniq] == spec["vae"]


def test_scaling_is_eight_over_rank():
    assert lora.scaling(4) == 2.0 and lora.scaling(8) == 1.0


def test_lora_delta_equals_peft_conv_formula():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, 3, 3, generator=g), torch.randn(5, 4, 1, 1, generator=g)
    # peft: conv2d(A.permute(1,0,2,3), B).permute(1,0,2,3) · s  (spec §3.3)
    peft_way = torch.nn.functional.conv2d(a.permute(1, 0, 2, 3), b).permute(1, 0, 2, 3) * 2.0
    assert torch.allclose(lora.lora_delta(a, b, 2.0).float(), peft_way, atol=1e-5)
    a2, b2 = torch.randn(4, 7, generator=g), torch.randn(3, 4, generator=g)
    assert torch.allclose(lora.lora_delta(a2, b2, 2.0).float(), 2.0 * b2 @ a2, atol=1e-5)


def test_merged_equals_unmerged(tiny_sd, tiny_ckpt):
    from osediff.core.model import OSEDiffModel

    merged = OSEDiffModel.from_pretrained(str(tiny_sd), str(tiny_ckpt), merge=True)
    unmerged = OSEDiffModel.from_pretrained(str(tiny_sd), str(tiny_ckpt), merge=False)
    plain = OSEDiffModel.from_pretrained(str(tiny_sd), None)
    assert any("lora" in n for n, _ in unmerged.unet.named_parameters())
    assert not any("lora" in n for n, _ in merged.unet.named_parameters())
    x = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    c = merged.encode_text(["a, b, ,"])
    with torch.no_grad():
        ym, yu, yp = merged(x, c), unmerged(x, c), plain(x, c)
    assert (ym - yu).abs().max() <= 1e-5
    assert (ym - yp).abs().max() > 1e-3  # the LoRA matters, so the equality above is not vacuous


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_by_layer_build_equals_merging_the_fp32_model(tiny_sd, tiny_ckpt, dtype, monkeypatch):
    """The streamed build (empty modules filled tensor by tensor, LoRA merged in fp32, then cast) gives bit for
    bit the weights of today's recipe: library load in fp32, merge, cast the whole model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from osediff.core import build
    from osediff.core.checkpoint import load_weights
    from osediff.files import tensors

    w = load_weights(str(tiny_ckpt))
    read = []
    orig = tensors.iter_tensors
    monkeypatch.setattr(tensors, "iter_tensors", lambda p, *a, **k: read.append(p) or orig(p, *a, **k))
    unet, vae, text, _ = build.load_base(str(tiny_sd), dtype, w)
    assert len(read) == 3  # all three modules took the streaming path
    ref_unet = UNet2DConditionModel.from_pretrained(str(tiny_sd), subfolder="unet")
    ref_vae = AutoencoderKL.from_pretrained(str(tiny_sd), subfolder="vae")
    ref_text = CLIPTextModel.from_pretrained(str(tiny_sd), subfolder="text_encoder")
    build.apply_weights(ref_unet, ref_vae, w, merge=True)
    for got, ref in [(unet, ref_unet), (vae, ref_vae), (text, ref_text)]:
        ref = ref.to(dtype)
        sd, rsd = got.state_dict(), ref.state_dict()
        assert sd.keys() == rsd.keys()
        assert all(sd[k].dtype == rsd[k].dtype and torch.equal(sd[k], rsd[k]) for k in sd)
    assert text.config._attn_implementation == "eager"
    plain = build.load_base(str(tiny_sd), dtype)[0]
    assert not torch.equal(unet.conv_in.weight, plain.conv_in.weight)  # the merge changed the weights


def test_unusual_folders_take_the_library_path_with_the_same_result(tiny_sd, tiny_ckpt, tmp_path, monkeypatch):
    import shutil

    from osediff.core import build
    from osediff.core.checkpoint import load_weights

    w = load_weights(str(tiny_ckpt))
    other = tmp_path / "sd"
    shutil.copytree(tiny_sd, other)
    # a second weight file (e.g. an fp16 variant next to the fp32 one): left to diffusers' own loader
    shutil.copy(other / "unet" / "diffusion_pytorch_model.safetensors", other / "unet" / "extra.safetensors")
    orig, streamed = build._stream_into, []
    monkeypatch.setattr(build, "_stream_into", lambda m, p, *a: streamed.append(p.parent.name) or orig(m, p, *a))
    a = build.load_base(str(tiny_sd), torch.bfloat16, w)[0].state_dict()
    b = build.load_base(str(other), torch.bfloat16, w)[0].state_dict()
    assert streamed.count("unet") == 1 and streamed.count("vae") == 2  # the second UNet came from diffusers
    assert all(torch.equal(a[k], b[k]) for k in a)
