"""The node pack under ComfyUI's memory manager (stubbed: tests/comfyui/comfy_stubs.py): the model and the tagger
are ModelPatchers that `load_models_gpu` lists, a second prompt reuses them, an evicted model comes back from
its RAM copy without a file being read; `dtype=auto` follows ComfyUI's precision checks."""

from __future__ import annotations

import sys
import types

import comfy_stubs
import pytest
import torch
from torch import nn

from osediff.core.model import OSEDiffModel
from osediff.core.pipeline import DTYPES, OSEDiffPipeline

comfy, pack, installed = comfy_stubs.comfy, comfy_stubs.pack, comfy_stubs.installed

_opened: list[str] = []
_recording: list[bool] = []


def _audit(event, args):  # every file Python opens while a test records (one hook per process: they stay)
    if _recording and event == "open" and isinstance(args[0], str):
        _opened.append(args[0])


sys.addaudithook(_audit)


def _load(pack, **kw):
    args = dict(base="sd21-tiny", weights="osediff.pkl", ram="none", dape="none", dtype="fp32") | kw
    return pack.NODE_CLASS_MAPPINGS["OSEDiffLoader"]().load(**args)[0]


def _upscale(pack, model, image, **kw):
    return pack.NODE_CLASS_MAPPINGS["OSEDiffUpscale"]().upscale(model, image, **kw)


def _image(seed=0):
    return torch.rand(1, 16, 12, 3, generator=torch.Generator().manual_seed(seed))


def _listed(mm) -> list:
    return [m.model for m in mm.current_loaded_models]


class Tagger(nn.Module):
    """A prompt extractor with weights, as RAM/DAPE is."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))

    def forward(self, images):
        return ["cat"] * images.shape[0]


def test_the_model_is_a_model_patcher_that_comfyui_lists(pack, installed):
    import comfy.model_management as mm

    pipe = _load(pack)
    [p] = installed.patchers  # made by the loader, once
    assert p.model.net is pipe.model and p.load_device == torch.device("cpu")
    assert type(p.model).__name__ == "OSEDiff"  # the name in ComfyUI's log: "Requested to load OSEDiff"
    assert p.model_size() == sum(t.numel() * t.element_size() for t in pipe.model.state_dict().values())
    assert _listed(mm) == []  # nothing loaded before a prompt runs
    out, _ = _upscale(pack, pipe.with_options(process_size=16), _image())
    assert out.shape == (1, 64, 48, 3)
    assert _listed(mm) == [p] and installed.moved_in == [p]
    assert installed.loads[0]["models"] == [p] and installed.loads[0]["memory_required"] > 0


def test_a_second_prompt_reuses_the_loaded_model_and_reads_no_file(pack, installed, monkeypatch):
    import comfy.model_management as mm

    pipe = _load(pack).with_options(process_size=16)
    first, _ = _upscale(pack, pipe, _image())

    def no_reading(*a, **k):
        raise AssertionError("weights read again")

    monkeypatch.setattr(OSEDiffPipeline, "from_pretrained", classmethod(no_reading))
    monkeypatch.setattr(OSEDiffModel, "from_pretrained", classmethod(no_reading))
    _opened.clear()
    _recording.append(True)
    try:
        again = _load(pack).with_options(process_size=16)  # the next prompt runs the loader again
        second, _ = _upscale(pack, again, _image())
    finally:
        _recording.clear()
    assert again.model is pipe.model and torch.equal(first, second)
    [p] = installed.patchers
    assert [c["models"] for c in installed.loads] == [[p], [p]]  # asked for twice, the same patcher
    assert installed.moved_in == [p] and _listed(mm) == [p]  # moved in once
    assert not [f for f in _opened if "osediff" in f.lower() or "sd21" in f.lower()], _opened


def test_evicted_it_leaves_the_list_and_the_next_run_reloads_from_ram(pack, installed, monkeypatch, tiny_sd,
                                                                        tiny_ckpt):
    import comfy.model_management as mm

    pipe = _load(pack).with_options(process_size=16)
    first, _ = _upscale(pack, pipe, _image())
    [p] = installed.patchers
    mm.unload_all_models()  # what POST /free {"unload_models": true} runs
    assert installed.evicted == [p] and _listed(mm) == []
    monkeypatch.setattr(OSEDiffModel, "from_pretrained", classmethod(lambda *a, **k: 1 / 0))
    _opened.clear()
    _recording.append(True)
    try:
        again, _ = _upscale(pack, _load(pack).with_options(process_size=16), _image())
    finally:
        _recording.clear()
    assert installed.moved_in == [p, p] and _listed(mm) == [p]
    assert torch.equal(first, again)
    weights = (str(tiny_sd), str(tiny_ckpt), str(installed.models))
    assert not [f for f in _opened if f.startswith(weights)], _opened


def test_the_tagger_is_managed_the_same_way(pack, installed):
    import comfy.model_management as mm

    base = _load(pack)
    tagger = Tagger()
    pipe = OSEDiffPipeline(base.model, tagger, base.options).with_options(process_size=16)
    _, prompt = _upscale(pack, pipe, _image())
    assert prompt == "cat, ,"
    model_p, tagger_p = installed.patchers
    assert tagger_p.model.net is tagger and installed.loads[-1]["models"] == [model_p, tagger_p]
    assert type(tagger_p.model).__name__ == "OSEDiffTagger"
    assert set(_listed(mm)) == {model_p, tagger_p}
    mm.unload_all_models()
    assert set(installed.evicted) == {model_p, tagger_p}


def test_weights_comfyui_left_behind_are_moved_by_the_pack(pack, comfy):
    import comfy.model_management as mm

    memory = sys.modules[pack.__name__ + ".memory"]
    comfy.device, comfy.leave_behind = torch.device("meta"), True  # a device apart from the CPU, lowvram-style load
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    pipe = types.SimpleNamespace(model=net, extractor=None)
    assert memory.load(pipe, 123) == torch.device("meta")
    assert comfy.loads[0]["force_full_load"] and comfy.loads[0]["memory_required"] == 123
    assert {t.device.type for t in net.parameters()} == {"meta"}
    assert _listed(mm) == [net.__dict__["_comfy_patcher"]]
    comfy.leave_behind = False  # and the check itself: what the stub loads fully is left alone
    other = nn.Linear(2, 2)
    memory.load(types.SimpleNamespace(model=other, extractor=None), 0)
    assert other.weight.device.type == "meta"


@pytest.mark.parametrize("device, fp16, bf16, cast, vram, want", [
    ("cpu", True, True, True, "NORMAL_VRAM", "fp32"),  # ComfyUI never picks a half type on the CPU
    ("cuda", True, True, False, "NORMAL_VRAM", "fp16"),  # fp16 first, as ComfyUI's unet_dtype
    ("cuda", False, True, False, "NORMAL_VRAM", "bf16"),
    ("cuda", False, False, False, "NORMAL_VRAM", "fp32"),  # --force-fp32, or a card without fast fp16
    ("cuda", False, False, True, "NORMAL_VRAM", "fp32"),  # fp16 only by casting: not worth it with room
    ("cuda", False, False, True, "LOW_VRAM", "fp16"),  # --lowvram: halve the weights even so
])
def test_auto_dtype_follows_comfyui(pack, installed, monkeypatch, device, fp16, bf16, cast, vram, want):
    import comfy.model_management as mm

    installed.device, installed.fp16, installed.bf16, installed.fp16_cast = torch.device(device), fp16, bf16, cast
    mm.vram_state = getattr(mm.VRAMState, vram)
    seen = {}
    pipe = types.SimpleNamespace(model=nn.Linear(2, 2), extractor=None)
    monkeypatch.setattr(OSEDiffPipeline, "from_pretrained",
                        classmethod(lambda cls, base, weights, **kw: seen.update(kw) or pipe))
    assert _load(pack, dtype="auto") is pipe
    assert seen["dtype"] == DTYPES[want] and seen["device"] == "cpu"  # built on the offload device
    assert all(a[1] == torch.device(device) for a in installed.precision_asked)
    assert _load(pack, dtype="bf16") is pipe and seen["dtype"] == torch.bfloat16  # an explicit choice is kept


def test_working_memory_grows_with_the_image_and_tiling_bounds_it(pack):
    memory = sys.modules[pack.__name__ + ".memory"]
    wm = memory.working_memory
    kw = dict(tile=96, encoder_tile=1024, decoder_tile=224)
    small, big = wm(512, 512, 2, **kw), wm(1024, 1024, 2, **kw)
    assert 0.4 * 2**30 < small < 1.0 * 2**30 and big > 3 * small  # 0.65 / 2.45 GiB measured (RESULTS.md)
    assert wm(512, 512, 4, **kw) > small  # fp32 needs more than bf16
    untiled = wm(2048, 2048, 2, tile=96, encoder_tile=4096, decoder_tile=512)
    tiled = wm(2048, 2048, 2, **kw)
    assert tiled < untiled and 3.5 * 2**30 < tiled < 6 * 2**30  # 4.3 GiB measured
    offloaded = wm(2048, 2048, 2, **kw, vae_offload=True)
    assert offloaded < tiled
    assert wm(2048, 2048, 2, tile=32, encoder_tile=256, decoder_tile=32, vae_offload=True) < offloaded
    assert wm(64, 64, 2, **kw, tagger=True) >= memory.TAGGER


def test_memory_required_reads_the_pipelines_options(pack, installed):
    memory = sys.modules[pack.__name__ + ".memory"]
    pipe = _load(pack)
    x = torch.rand(1, 3, 160, 128)  # ×4: 512×640, no small-input guard
    need = memory.memory_required(pipe, x)
    assert need == memory.working_memory(512, 640, 4, tile=96, encoder_tile=1024, decoder_tile=224)
    guarded = memory.memory_required(pipe, torch.rand(1, 3, 160, 96))  # 96 px < 512/4: guard to 128×213 first
    assert guarded == memory.working_memory(512, 852, 4, tile=96, encoder_tile=1024, decoder_tile=224)
    x = torch.rand(1, 3, 320, 256)
    assert memory.memory_required(pipe.with_options(scale=2), x) < memory.memory_required(pipe, x)


def test_cached_prompt_embeddings_move_with_the_model(pack, installed):
    model = _load(pack).model
    model.encode_text(["a cat"])
    model.to(torch.float64)
    assert model._cache["a cat"].dtype == torch.float64
    model.to("meta")  # stands for a GPU: what ComfyUI's eviction moves back must leave nothing behind there
    assert model._cache["a cat"].device.type == "meta"
