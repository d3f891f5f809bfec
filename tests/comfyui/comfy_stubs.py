"""Fixtures for the node-pack tests (a module, not a conftest.py, so that the suite's `from conftest import ...`
keeps finding tests/conftest.py). ComfyUI stand-ins at the boundary the node pack uses (it is not on PyPI): `folder_paths` with a models
folder under tmp, `comfy.model_management` and `comfy.utils` recording what the nodes call. The pack is then
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
        self.freed: list[tuple[float, torch.device]] = []
        self.bars: list[list[int]] = []  # per ProgressBar: [total, current]
        self.bar_values: list[int] = []  # every value a bar was set to, in order
        self.checks = 0
        self.interrupt_after: int | None = None
        self.emptied = 0


def _folder_paths(c: Comfy) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(c.models)
    fp.folder_names_and_paths = {"diffusers": ([str(c.models / "diffusers")], ["folder"])}

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

    mm.InterruptProcessingException = InterruptProcessingException
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.free_memory = lambda required, device, keep_loaded=(): c.freed.append((required, device))
    mm.soft_empty_cache = soft_empty_cache
    return mm


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
    pkg.model_management, pkg.utils = _model_management(c), _utils(c)
    for name, mod in (("folder_paths", _folder_paths(c)), ("comfy", pkg),
                      ("comfy.model_management", pkg.model_management), ("comfy.utils", pkg.utils)):
        monkeypatch.setitem(sys.modules, name, mod)
    return c


def load_pack(root: Path, monkeypatch) -> types.ModuleType:
    """The node pack, imported as ComfyUI imports custom_nodes/<folder> (a package named by its path)."""
    name = str(root / "custom_nodes" / "ComfyUI-OSEDiff").replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, PACK / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    for sub in ("models", "nodes"):  # dropped again after the test
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
