"""Where ComfyUI users keep the weights: SD 2.1-base as one file in `models/checkpoints/` (and folders that
`extra_model_paths.yaml` adds), the OSEDiff LoRA in `models/loras/`; listed by their ComfyUI names, other
checkpoints and LoRAs left out, and a single-file base giving the same image as the diffusers folder. Plus the
TF32 matmuls an fp32 run on CUDA gets once ComfyUI has moved the model there."""

from __future__ import annotations

import comfy_stubs
import pytest
import torch
from safetensors.torch import save_file

from osediff.testing import write_ldm_checkpoint

comfy, pack, installed = comfy_stubs.comfy, comfy_stubs.pack, comfy_stubs.installed
NAME = "v2-1_512-ema-pruned.safetensors"


@pytest.fixture(autouse=True)
def tiny_configs(tiny_sd, monkeypatch):
    """The tiny model's configs stand in for the carried full-size SD 2.1 ones (as in tests/weights)."""
    monkeypatch.setenv("OSEDIFF_BASE_CONFIG", str(tiny_sd))


@pytest.fixture(scope="module")
def single(tiny_sd, tmp_path_factory):
    """The tiny SD 2.1-base as one LDM-layout file, and the same tensors declared v-prediction (SD 2.1 768)."""
    d = tmp_path_factory.mktemp("single")
    v = {"modelspec.predict_key": "v"}
    return write_ldm_checkpoint(tiny_sd, d / NAME), write_ldm_checkpoint(tiny_sd, d / "v.safetensors", metadata=v)


def _link(folder, name, target):
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).symlink_to(target)
    return folder / name


def _models(pack):
    import sys

    return sys.modules[pack.__name__ + ".models"]


def _load(pack, **kw):
    args = dict(base=NAME, weights="osediff.pkl", ram="none", dape="none", dtype="fp32") | kw
    return pack.NODE_CLASS_MAPPINGS["OSEDiffLoader"]().load(**args)[0]


def test_single_file_base_is_listed_and_located(pack, installed, single):
    good, v768 = single
    ckpts = installed.models / "checkpoints"
    _link(ckpts, NAME, good)
    _link(ckpts, "sd/copy.safetensors", good)  # in a sub-folder: listed by its relative name
    _link(ckpts, "768-v.safetensors", v768)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, ckpts / "other.safetensors")
    save_file({"lora_unet_down.weight": torch.zeros(4, 4)}, ckpts / "not-a-checkpoint.safetensors")
    (ckpts / "notes.txt").write_text("not a model")

    base = pack.NODE_CLASS_MAPPINGS["OSEDiffLoader"].INPUT_TYPES()["required"]["base"][0]
    assert base == ["stable-diffusion-2-1-base", "sd/copy.safetensors", "sd21-tiny", NAME]  # folders stay
    m = _models(pack)
    assert m.locate("base", NAME) == str(ckpts / NAME)
    assert m.locate("base", "sd/copy.safetensors") == str(ckpts / "sd" / "copy.safetensors")
    assert m.locate("base", "sd21-tiny") == str(installed.models / "diffusers" / "sd21-tiny")


def test_extra_model_paths_checkpoints_are_listed(pack, installed, single, tmp_path):
    import folder_paths

    extra = tmp_path / "elsewhere" / "checkpoints"
    _link(extra, NAME, single[0])
    folder_paths.add_model_folder_path("checkpoints", str(extra))  # what extra_model_paths.yaml does
    assert NAME in _models(pack).base_choices()
    assert _models(pack).locate("base", NAME) == str(extra / NAME)


def test_osediff_lora_in_models_loras_is_listed_and_located(pack, comfy, tiny_sd, tiny_ckpt):
    (comfy.models / "diffusers" / "sd21-tiny").symlink_to(tiny_sd, target_is_directory=True)
    loras = comfy.models / "loras"
    _link(loras, "osediff/osediff_x4.pkl", tiny_ckpt)
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8)}, loras / "style.safetensors")
    torch.save({"state_dict": {"a": torch.zeros(2)}}, loras / "other.pt")

    req = pack.NODE_CLASS_MAPPINGS["OSEDiffLoader"].INPUT_TYPES()["required"]
    assert req["weights"][0] == ["osediff.pkl", "osediff/osediff_x4.pkl"]  # the default name, then ours only
    assert "osediff/osediff_x4.pkl" not in req["ram"][0] and "osediff/osediff_x4.pkl" not in req["dape"][0]
    assert _models(pack).locate("weights", "osediff/osediff_x4.pkl") == str(loras / "osediff" / "osediff_x4.pkl")
    assert _load(pack, base="sd21-tiny", weights="osediff/osediff_x4.pkl").model.device.type == "cpu"


def test_upscale_with_single_file_base_equals_folder_base(pack, installed, single):
    _link(installed.models / "checkpoints", NAME, single[0])
    image = torch.rand(1, 24, 20, 3, generator=torch.Generator().manual_seed(0))  # IMAGE (B,H,W,C)
    up = pack.NODE_CLASS_MAPPINGS["OSEDiffUpscale"]()
    outs = {}
    for base in ("sd21-tiny", NAME):
        model = _load(pack, base=base)
        outs[base] = up.upscale(model.with_options(process_size=16), image, scale=4.0, color_fix="adain")[0]
    assert outs[NAME].shape == (1, 96, 80, 3)
    assert torch.equal(outs[NAME], outs["sd21-tiny"])


def test_single_file_base_reaches_from_pretrained_as_its_path(pack, installed, single, monkeypatch):
    import types

    from osediff.core.pipeline import OSEDiffPipeline

    _link(installed.models / "checkpoints", NAME, single[0])
    seen = {}

    def fake(cls, base, weights, **kw):
        seen.update(base=base, weights=weights)
        return types.SimpleNamespace(model=torch.nn.Linear(2, 2), extractor=None)

    monkeypatch.setattr(OSEDiffPipeline, "from_pretrained", classmethod(fake))
    _load(pack)
    assert seen == {"base": str(installed.models / "checkpoints" / NAME),
                    "weights": str(installed.models / "osediff" / "osediff.pkl")}


# --- TF32 on CUDA -----------------------------------------------------------------------------------------------
@pytest.fixture
def tf32_off():
    """Both flags off for the test, restored after (torch's backend flags are not plain attributes)."""
    was = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = was


@pytest.mark.parametrize("device, dtype, on", [("cuda", torch.float32, True), ("cuda:0", torch.float32, True),
                                               ("cuda", torch.float16, False), ("cpu", torch.float32, False)])
def test_fp32_on_cuda_gets_the_references_tf32(pack, comfy, tf32_off, monkeypatch, device, dtype, on):
    """The pipeline is built on the CPU; once ComfyUI has it on a CUDA device (mocked: the stubbed load device is
    CUDA and the move is skipped, there is no GPU here), an fp32 run switches TF32 on as from_pretrained does."""
    import sys
    import types

    comfy.device = torch.device(device)
    mem = __import__(pack.__name__ + ".memory", fromlist=["load"])
    monkeypatch.setattr(mem, "_stray", lambda module, dev: False)
    monkeypatch.setattr(sys.modules["comfy.model_patcher"].ModelPatcher, "load", lambda self, dev, full=True: None)
    net = torch.nn.Linear(2, 2).to(dtype)
    net.dtype = dtype  # what OSEDiffModel.dtype reports
    assert mem.load(types.SimpleNamespace(model=net, extractor=None), 0) == torch.device(device)
    assert torch.backends.cuda.matmul.allow_tf32 is on and torch.backends.cudnn.allow_tf32 is on
