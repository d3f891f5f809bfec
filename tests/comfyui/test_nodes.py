"""The ComfyUI node pack against stubbed ComfyUI modules: the node contract, both nodes on the tiny random
model (output equal to the Python API's `pipe(tensor)`), and the error paths."""

from __future__ import annotations

import types

import comfy_stubs
import pytest
import torch

from osediff.core.pipeline import OSEDiffPipeline
from osediff.weights.locate import MissingWeightsError, missing_message

# the fixtures (stubbed ComfyUI, the pack loaded into it, the tiny weights installed in its models folder)
comfy, pack, pack_loader, installed = comfy_stubs.comfy, comfy_stubs.pack, comfy_stubs.pack_loader, comfy_stubs.installed


def _images(b=2, h=24, w=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, 3, generator=g)  # ComfyUI IMAGE: (B,H,W,C) float [0,1]


def _load(pack, **kw):
    args = dict(base="sd21-tiny", weights="osediff.pkl", ram="none", dape="none", dtype="fp32") | kw
    return pack.NODE_CLASS_MAPPINGS["OSEDiffLoader"]().load(**args)[0]


def _fast(pack, **kw):
    """The loaded pipeline with the small-input guard lowered, so the tiny images run at their own size."""
    return _load(pack, **kw).with_options(process_size=16)


def _upscale(pack, model, image, **kw):
    return pack.NODE_CLASS_MAPPINGS["OSEDiffUpscale"]().upscale(model, image, **kw)


# --- contract ---------------------------------------------------------------------------------------------
def test_node_ids_names_and_types(pack, installed):
    m = pack.NODE_CLASS_MAPPINGS
    assert set(m) == {"OSEDiffLoader", "OSEDiffUpscale"}
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(m)
    assert all(pack.NODE_DISPLAY_NAME_MAPPINGS.values())
    assert m["OSEDiffLoader"].RETURN_TYPES == ("OSEDIFF_MODEL",)
    assert m["OSEDiffUpscale"].RETURN_TYPES == ("IMAGE", "STRING")
    for cls in m.values():
        assert callable(getattr(cls, cls.FUNCTION))

    loader = m["OSEDiffLoader"].INPUT_TYPES()["required"]
    assert list(loader) == ["base", "weights", "ram", "dape", "dtype"]
    assert loader["base"][0] == ["stable-diffusion-2-1-base", "sd21-tiny"]  # CLI default name first
    assert loader["weights"][0] == ["osediff.pkl"]
    assert loader["ram"][0] == ["ram_swin_large_14m.pth", "osediff.pkl", "none"]
    assert loader["dape"][0][0] == "DAPE.pth" and loader["dape"][0][-1] == "none"
    assert loader["dtype"][0] == ["auto", "fp16", "bf16", "fp32"] and loader["dtype"][1]["default"] == "auto"

    up = m["OSEDiffUpscale"].INPUT_TYPES()
    assert list(up["required"]) == ["model", "image", "scale", "color_fix", "prompt"]
    assert up["required"]["model"] == ("OSEDIFF_MODEL",) and up["required"]["image"] == ("IMAGE",)
    assert up["required"]["scale"][0] == "FLOAT" and up["required"]["scale"][1]["default"] == 4.0
    assert up["required"]["color_fix"][0] == ["adain", "wavelet", "none"]
    assert up["required"]["prompt"][0] == "STRING" and up["required"]["prompt"][1]["default"] == ""
    assert list(up["optional"]) == ["tags", "tile", "tile_overlap", "vae_encoder_tile", "vae_decoder_tile"]
    assert up["optional"]["tile"][1]["default"] == 96 and up["optional"]["vae_decoder_tile"][1]["default"] == 224


def test_imports_with_only_folder_paths(pack_loader, monkeypatch):
    import sys

    for name in ("comfy", "comfy.model_management", "comfy.utils"):
        monkeypatch.setitem(sys.modules, name, None)  # `import comfy...` now raises ImportError
    pack = pack_loader()
    assert set(pack.NODE_CLASS_MAPPINGS) == {"OSEDiffLoader", "OSEDiffUpscale"}
    assert pack.NODE_CLASS_MAPPINGS["OSEDiffUpscale"].INPUT_TYPES()["required"]["scale"][0] == "FLOAT"


def test_registers_models_osediff(pack, comfy):
    import folder_paths

    folders, exts = folder_paths.folder_names_and_paths["osediff"]
    assert folders == [str(comfy.models / "osediff")] and ".pkl" in exts and ".safetensors" in exts


def test_weights_found_in_osediffs_own_models_folder(pack, comfy, tiny_sd, tiny_ckpt):
    own = comfy.root / "osediff-models"
    own.mkdir()
    (own / "stable-diffusion-2-1-base").symlink_to(tiny_sd, target_is_directory=True)
    (own / "osediff.pkl").symlink_to(tiny_ckpt)
    pipe = _load(pack, base="stable-diffusion-2-1-base")
    assert isinstance(pipe, OSEDiffPipeline)


# --- both nodes on the tiny model ---------------------------------------------------------------------------
def test_upscale_equals_python_api(pack, installed, tiny_sd, tiny_ckpt):
    model = _load(pack)
    assert model is _load(pack), "the loader must reuse the loaded pipeline across prompts"
    assert model.extractor is None and model.model.device.type == "cpu"
    model = model.with_options(process_size=16)  # no small-input guard: fast
    image = _images(b=2)  # two different images in one batch
    out, prompt = _upscale(pack, model, image, scale=4.0, color_fix="adain", prompt="")
    assert out.shape == (2, 96, 80, 3) and out.dtype == torch.float32
    api = OSEDiffPipeline.from_pretrained(str(tiny_sd), str(tiny_ckpt), device="cpu", dtype="fp32", use_dape=False).with_options(process_size=16)
    x = image.permute(0, 3, 1, 2)
    for i in range(2):
        assert torch.equal(out[i], api(x[i:i + 1])[0].permute(1, 2, 0))
    assert not torch.equal(out[0], out[1])
    assert prompt == ", ,\n, ,"
    assert installed.bars == [[2 * pack.nodes.STEPS, 2 * pack.nodes.STEPS]]
    assert len(installed.loads) == 1 and installed.loads[0]["models"] == [model.model.__dict__["_comfy_patcher"]]
    assert installed.loads[0]["memory_required"] > 0 and installed.loads[0]["force_full_load"]


def test_tags_replace_dapes_and_prompt_is_reported(pack, installed):
    model = _fast(pack)
    image = _images(b=1)
    plain, _ = _upscale(pack, model, image, color_fix="none", prompt="")
    out, prompt = _upscale(pack, model, image, color_fix="none", prompt="sharp", tags="cat, dog")
    assert prompt == "cat, dog, sharp,"
    tagged = OSEDiffPipeline(model.model, lambda im: ["cat, dog"] * im.shape[0],
                             model.options).with_options(color_fix="none")
    assert torch.equal(out, tagged(image.permute(0, 3, 1, 2), prompt="sharp").permute(0, 2, 3, 1))
    assert not torch.equal(out, plain)


def test_dape_tags_are_reported_per_image(pack, installed):
    model = _fast(pack)
    tagger = lambda im: [f"tag{i}" for i in range(im.shape[0])]  # noqa: E731
    model = OSEDiffPipeline(model.model, tagger, model.options)
    _, prompt = _upscale(pack, model, _images(b=2), prompt="p")
    assert prompt == "tag0, p,\ntag0, p,"  # one image per pipeline call


def test_scale_and_tile_inputs_reach_the_pipeline(pack, installed):
    model = _fast(pack)
    out, _ = _upscale(pack, model, _images(b=1, h=16, w=12), scale=2.0, tile=16, tile_overlap=8,
                      vae_decoder_tile=64)
    assert out.shape == (1, 32, 24, 3)
    ref = model.with_options(scale=2, tile=16, tile_overlap=8, vae_decoder_tile=64)
    assert torch.equal(out, ref(_images(b=1, h=16, w=12).permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


def test_scale_value(pack):
    import sys
    from dataclasses import fields

    from osediff.core.options import SROptions

    sv = sys.modules[pack.__name__ + ".nodes"].scale_value
    assert sv(4.0) == 4 and isinstance(sv(4.0), int)
    if "float" in str(next(f.type for f in fields(SROptions) if f.name == "scale")):
        assert sv(2.5) == 2.5
    else:
        with pytest.raises(ValueError, match="whole-number"):
            sv(2.5)


def test_image_channels(pack):
    import sys

    to_nchw = sys.modules[pack.__name__ + ".nodes"].to_nchw
    rgba = torch.rand(1, 5, 6, 4)
    assert torch.equal(to_nchw(rgba), rgba[..., :3].permute(0, 3, 1, 2))
    grey = torch.rand(1, 5, 6, 1)
    assert torch.equal(to_nchw(grey), grey.permute(0, 3, 1, 2).expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match="IMAGE"):
        to_nchw(torch.rand(5, 6, 3))


# --- error paths --------------------------------------------------------------------------------------------
def test_missing_weights_give_the_cli_message(pack, comfy, tiny_sd, tiny_ckpt):
    (comfy.models / "diffusers" / "sd21-tiny").symlink_to(tiny_sd, target_is_directory=True)
    loader = pack.NODE_CLASS_MAPPINGS["OSEDiffLoader"]
    assert loader.INPUT_TYPES()["required"]["weights"][0] == ["osediff.pkl"]  # listed though missing
    with pytest.raises(MissingWeightsError) as e:
        _load(pack)
    assert str(e.value).startswith(missing_message("weights"))
    assert str(comfy.models / "osediff") in str(e.value)
    assert str(comfy.models / "loras") in str(e.value)
    with pytest.raises(MissingWeightsError, match="Stable Diffusion 2.1-base") as e:
        _load(pack, base="stable-diffusion-2-1-base")
    assert str(comfy.models / "checkpoints") in str(e.value) and str(comfy.models / "diffusers") in str(e.value)
    (comfy.models / "osediff").mkdir()
    (comfy.models / "osediff" / "osediff.pkl").symlink_to(tiny_ckpt)
    with pytest.raises(MissingWeightsError, match="RAM Swin-L"):
        _load(pack, ram="ram_swin_large_14m.pth", dape="DAPE.pth")


def test_none_tagger_and_half_a_tagger(pack, installed, monkeypatch):
    assert _load(pack, ram="none", dape="none").extractor is None
    with pytest.raises(ValueError, match="both"):
        _load(pack, ram="osediff.pkl", dape="none")
    seen = {}
    pipe = types.SimpleNamespace(model=torch.nn.Linear(2, 2), extractor=None)

    def fake(cls, base, weights, **kw):
        seen.update(kw, base=base, weights=weights)
        return pipe

    monkeypatch.setattr(OSEDiffPipeline, "from_pretrained", classmethod(fake))
    (installed.models / "osediff" / "ram.pth").write_bytes(b"r")
    (installed.models / "osediff" / "DAPE.pth").write_bytes(b"d")
    assert _load(pack, ram="ram.pth", dape="DAPE.pth", dtype="auto") is pipe
    assert seen["ram"] == str(installed.models / "osediff" / "ram.pth") and seen["use_dape"] is True
    assert seen["dtype"] == torch.float32  # auto: ComfyUI's choice, which is fp32 on the CPU
    assert seen["device"] == "cpu"  # the offload device


def test_the_loaders_max_memory_reaches_the_pipeline(pack, installed):
    assert _load(pack).options.max_memory is None  # 0 on the node: automatic
    assert _load(pack, max_memory=2.5).options.max_memory == 2.5


def test_interrupted_run_stops_within_an_image_and_the_bar_follows_the_tiles(pack, installed, monkeypatch):
    model = _fast(pack)
    calls = []
    real = OSEDiffPipeline.__call__
    monkeypatch.setattr(OSEDiffPipeline, "__call__",
                        lambda self, x, prompt=None, progress=None: calls.append(1) or real(self, x, prompt,
                                                                                             progress=progress))
    _upscale(pack, model, _images(b=2))
    steps = pack.nodes.STEPS
    values = installed.bar_values
    assert installed.bars[-1] == [2 * steps, 2 * steps] and values == sorted(values)  # moves forward only
    assert len(set(values)) > 6  # stage by stage within each image, not just once per image
    installed.bar_values.clear()
    calls.clear()
    installed.checks = 0
    installed.interrupt_after = 3  # before image 1, then its "tags" stage pass; its "encode" stage raises
    import comfy.model_management as mm

    with pytest.raises(mm.InterruptProcessingException):
        _upscale(pack, model, _images(b=3))
    assert len(calls) == 1 and max(installed.bar_values) < steps  # stopped inside the first image


def test_out_of_memory_retries_with_smaller_tiles(pack, installed, monkeypatch):
    model = _fast(pack)
    tried = []
    real = OSEDiffPipeline.__call__

    def limited(self, x, prompt=None, progress=None):
        tried.append(self.options.tile)
        if self.options.tile > 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, x, prompt)

    monkeypatch.setattr(OSEDiffPipeline, "__call__", limited)
    image = _images(b=2)
    out, _ = _upscale(pack, model, image)
    assert tried == [96, 48, 32, 32]  # the second image starts with the tiles that fitted
    assert installed.emptied == 2
    fitted = model.with_options(tile=32, tile_overlap=16, vae_encoder_tile=256, vae_decoder_tile=64)
    monkeypatch.setattr(OSEDiffPipeline, "__call__", real)
    assert torch.equal(out[0], fitted(image[:1].permute(0, 3, 1, 2))[0].permute(1, 2, 0))


def test_an_out_of_memory_retry_after_the_tags_gives_one_prompt_line_per_image(pack, installed, monkeypatch):
    from osediff.core.model import OSEDiffModel

    model = _fast(pack)
    real, failed = OSEDiffModel.forward, []

    def once_out_of_memory(self, *a, **k):  # after the tags were read, as a real UNet OOM would be
        if not failed:
            failed.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *a, **k)

    monkeypatch.setattr(OSEDiffModel, "forward", once_out_of_memory)
    _, text = _upscale(pack, model, _images(b=2), tags="dog", prompt="sharp")
    assert failed and text == "dog, sharp,\ndog, sharp,"


def test_out_of_memory_at_the_floor_and_other_errors_are_raised(pack, installed, monkeypatch):
    model = _fast(pack)
    tried = []

    def oom(self, x, prompt=None, progress=None):
        tried.append(self.options.tile)
        raise RuntimeError("MPS backend out of memory")

    monkeypatch.setattr(OSEDiffPipeline, "__call__", oom)
    with pytest.raises(RuntimeError, match="out of memory"):
        _upscale(pack, model, _images(b=1))
    assert tried == [96, 48, 32, 32]  # the last try: the VAE encoder tile still halved, to its floor 128
    tried.clear()
    monkeypatch.setattr(OSEDiffPipeline, "__call__", lambda self, x, prompt=None, progress=None: tried.append(1) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        _upscale(pack, model, _images(b=1))
    assert tried == [1]
