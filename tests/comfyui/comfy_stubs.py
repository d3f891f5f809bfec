"""Fixtures for the node-pack tests (a module, not a conftest.py, so that the suite's `from conftest import ...`
keeps finding tests/conftest.py). ComfyUI stand-ins at the boundary the node pack uses (it is not on PyPI): `folder_paths` with a models
folder under tmp, `comfy.model_management` (its memory manager: `load_models_gpu`, `current_loaded_models`,
eviction), `comfy.model_patcher.ModelPatcher` and `comfy.utils`, recording what the nodes call. The pack is then
loaded from its folder the way ComfyUI loads a custom node (a package named by its path)."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

PACK = Path(__file__).resolve().parents[2] / "comfyui"


class Comfy:
    """What the stubs saw, and the knobs a test turns (interrupt_after: raise at the n-th interruption check)."""

    def __init__(self, root: Path):
        self.root, self.models = root, root / "models"
        self.loads: list[dict] = []  # one per load_models_gpu call: patchers, memory_required, force_full_load
        self.moved_in: list = []  # patchers moved onto the device, in order (a reload appears again)
        self.evicted: list = []  # patchers moved back to the offload device, in order
        self.patchers: list = []  # every ModelPatcher made
        self.device = torch.device("cpu")  # get_torch_device()
        self.leave_behind = False  # load like ComfyUI's lowvram path: plain nn weights stay where they are
        self.fp16 = self.bf16 = False  # what should_use_fp16 / should_use_bf16 answer (performance first)
        self.fp16_cast = False  # should_use_fp16(..., manual_cast=True, prioritize_performance=False)
        self.precision_asked: list[tuple] = []
        self.bars: list[list[int]] = []  # per ProgressBar: [total, current]
        self.bar_values: list[int] = []  # every value a bar was set to, in order
        self.checks = 0
        self.interrupt_after: int | None = None
        self.emptied = 0


def _folder_paths(c: Comfy) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(c.models)
    pt = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}  # ComfyUI's supported_pt_extensions
    fp.folder_names_and_paths = {"diffusers": ([str(c.models / "diffusers")], ["folder"]),
                                 "checkpoints": ([str(c.models / "checkpoints")], pt),
                                 "loras": ([str(c.models / "loras")], pt)}

    def get_folder_paths(kind):
        return list(fp.folder_names_and_paths[kind][0])

    def add_model_folder_path(kind, path, is_default=False):
        fp.folder_names_and_paths.setdefault(kind, ([], set()))[0].append(path)

    def get_filename_list(kind):
        folders, exts = fp.folder_names_and_paths[kind]
        return sorted(str(p.relative_to(f)) for f in map(Path, folders) if f.is_dir() for p in f.rglob("*")
                      if p.is_file() and (not exts or p.suffix in exts))

    def get_full_path(kind, name):
        for f in get_folder_paths(kind):
            if os.path.isfile(os.path.join(f, name)):
                return os.path.join(f, name)
        return None

    fp.get_folder_paths, fp.add_model_folder_path = get_folder_paths, add_model_folder_path
    fp.get_filename_list, fp.get_full_path = get_filename_list, get_full_path
    return fp


def _model_management(c: Comfy) -> types.ModuleType:
    mm = types.ModuleType("comfy.model_management")

    class InterruptProcessingException(Exception):
        pass

    def throw_exception_if_processing_interrupted():
        c.checks += 1
        if c.interrupt_after is not None and c.checks > c.interrupt_after:
            raise InterruptProcessingException()

    def soft_empty_cache(force=False):
        c.emptied += 1

    class VRAMState:  # ComfyUI's enum, the members the pack reads
        NORMAL_VRAM, LOW_VRAM, NO_VRAM = "NORMAL_VRAM", "LOW_VRAM", "NO_VRAM"

    class LoadedModel:  # ComfyUI's entry of current_loaded_models: the patcher, and the device it is on
        def __init__(self, patcher):
            self.model, self.device = patcher, patcher.load_device

        def model_unload(self):
            self.model.detach()

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        c.loads.append(dict(models=list(models), memory_required=memory_required, force_full_load=force_full_load))
        for p in models:
            if not any(m.model is p for m in mm.current_loaded_models):
                p.load(p.load_device, full=force_full_load and not c.leave_behind)
                mm.current_loaded_models.insert(0, LoadedModel(p))

    def free_memory(memory_required, device, keep_loaded=()):
        # as ComfyUI with no room at all: every model on that device not kept goes
        gone = [m for m in mm.current_loaded_models if m.device == device and m not in keep_loaded]
        for m in gone:
            m.model_unload()
            mm.current_loaded_models.remove(m)
        return gone

    def should_use(kind):
        def ask(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
            c.precision_asked.append((kind, device, model_params, prioritize_performance, manual_cast))
            if torch.device(device).type == "cpu":
                return False
            if manual_cast and not prioritize_performance and kind == "fp16":
                return c.fp16_cast or c.fp16
            return c.fp16 if kind == "fp16" else c.bf16
        return ask

    mm.InterruptProcessingException = InterruptProcessingException
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.get_torch_device = lambda: c.device
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.current_loaded_models = []
    mm.load_models_gpu, mm.free_memory = load_models_gpu, free_memory
    mm.unload_all_models = lambda: free_memory(1e30, mm.get_torch_device())  # what POST /free runs
    mm.soft_empty_cache = soft_empty_cache
    mm.VRAMState = VRAMState
    mm.should_use_fp16, mm.should_use_bf16 = should_use("fp16"), should_use("bf16")
    mm.vram_state = VRAMState.NORMAL_VRAM  # --lowvram: LOW_VRAM
    return mm


def _model_patcher(c: Comfy) -> types.ModuleType:
    mp = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        """ComfyUI's bookkeeping on the module it holds (`device` written onto it), its size from the state
        dict; `load` moves everything, or with `c.leave_behind` only the first half of the layers (a
        lowvram load leaves plain nn layers behind); `detach` moves it back to the offload device."""

        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device
            self.model.device = offload_device  # ComfyUI does this for a module without a `device` attribute
            self.model.model_loaded_weight_memory = 0
            c.patchers.append(self)

        def model_size(self):
            return sum(t.nelement() * t.element_size() for t in self.model.state_dict().values())

        def load(self, device, full=True):
            leaves = [m for m in self.model.modules() if next(m.parameters(recurse=False), None) is not None]
            for m in leaves if full else leaves[:len(leaves) // 2]:
                m.to(device)
            self.model.device = device
            self.model.model_loaded_weight_memory = self.model_size()
            c.moved_in.append(self)

        def detach(self, unpatch_all=True):
            self.model.to(self.offload_device)
            self.model.device = self.offload_device
            self.model.model_loaded_weight_memory = 0
            c.evicted.append(self)
            return self.model

    mp.ModelPatcher = ModelPatcher
    return mp


def _utils(c: Comfy) -> types.ModuleType:
    u = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.state = [total, 0]
            c.bars.append(self.state)

        def update_absolute(self, value, total=None, preview=None):  # ComfyUI's: clipped to the total
            if total is not None:
                self.state[0] = total
            self.state[1] = min(value, self.state[0])
            c.bar_values.append(self.state[1])

        def update(self, value):
            self.update_absolute(self.state[1] + value)

    u.ProgressBar = ProgressBar
    return u


@pytest.fixture
def comfy(tmp_path, monkeypatch) -> Comfy:
    """Stubbed ComfyUI (models folder tmp/models, osediff's own models folder tmp/osediff-models, empty)."""
    c = Comfy(tmp_path)
    (c.models / "diffusers").mkdir(parents=True)
    monkeypatch.setenv("OSEDIFF_MODELS", str(tmp_path / "osediff-models"))
    for env in ("OSEDIFF_BASE", "OSEDIFF_WEIGHTS", "OSEDIFF_RAM", "OSEDIFF_DAPE"):
        monkeypatch.delenv(env, raising=False)
    pkg = types.ModuleType("comfy")
    pkg.model_management, pkg.model_patcher, pkg.utils = _model_management(c), _model_patcher(c), _utils(c)
    for name, mod in (("folder_paths", _folder_paths(c)), ("comfy", pkg),
                      ("comfy.model_management", pkg.model_management), ("comfy.model_patcher", pkg.model_patcher),
                      ("comfy.utils", pkg.utils)):
        monkeypatch.setitem(sys.modules, name, mod)
    return c


def load_pack(root: Path, monkeypatch) -> types.ModuleType:
    """The node pack, imported as ComfyUI imports custom_nodes/<folder> (a package named by its path)."""
    name = str(root / "custom_nodes" / "ComfyUI-OSEDiff").replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, PACK / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    for sub in ("memory", "models", "nodes"):  # dropped again after the test
        monkeypatch.setitem(sys.modules, f"{name}.{sub}", None)
        monkeypatch.delitem(sys.modules, f"{name}.{sub}")
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def pack(comfy, monkeypatch):
    return load_pack(comfy.root, monkeypatch)


@pytest.fixture
def pack_loader(comfy, monkeypatch):
    """Imports the pack on call, for tests that change the stubs first."""
    return lambda: load_pack(comfy.root, monkeypatch)


@pytest.fixture
def installed(comfy, tiny_sd, tiny_ckpt):
    """The tiny SD folder in models/diffusers/, the tiny OSEDiff checkpoint in models/osediff/."""
    (comfy.models / "diffusers" / "sd21-tiny").symlink_to(tiny_sd, target_is_directory=True)
    (comfy.models / "osediff").mkdir()
    (comfy.models / "osediff" / "osediff.pkl").symlink_to(tiny_ckpt)
    return comfy
