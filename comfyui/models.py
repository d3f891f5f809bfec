"""Where the node pack finds OSEDiff's weights inside ComfyUI, and the one cached pipeline.

Two places are searched for every weight, in this order:
1. ComfyUI's model folders: SD 2.1-base as a diffusers folder in `models/diffusers/` (any folder holding a
   `model_index.json`, as ComfyUI's own diffusers loader lists them) or as one file in `models/checkpoints/`
   (those `osediff.weights.single_file.looks_like_sd21_base` accepts, by their ComfyUI name); the OSEDiff,
   RAM and DAPE files in `models/osediff/` — a model folder kind this pack registers — and the OSEDiff LoRA
   also in `models/loras/` (the files there that pass `check_osediff`, so other LoRAs stay out of the list).
   `extra_model_paths.yaml` additions count for every kind (`checkpoints`, `loras`, `osediff`);
2. osediff's own models folder (`$OSEDIFF_MODELS`, default `~/.cache/osediff/models`, see the README
   "Weights"), so weights already set up for the CLI are found without copying them.

The file lists offered in the UI always contain the default file names of the CLI (`osediff.pkl`,
`DAPE.pth`...), even when missing: running a workflow with one then raises the CLI's missing-weight message
(what to download, where to put it) in the UI instead of a bare "value not in list".

This is the only module of the pack that imports osediff's weight-location and weight-checking helpers.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
from pathlib import Path

import folder_paths  # ComfyUI's; a plain Python can stub it (tests/comfyui/conftest.py)

from osediff.weights import locate as wts
from osediff.weights.check import check_osediff
from osediff.weights.single_file import SUFFIXES, looks_like_sd21_base

log = logging.getLogger(__name__)

FOLDER_KIND = "osediff"
EXTENSIONS = {".pkl", ".safetensors", ".pth", ".pt", ".bin"}
NONE = "none"  # the `ram`/`dape` choice that runs without the tagger
CHECKPOINTS, LORAS = "checkpoints", "loras"  # ComfyUI's folder kinds for single-file bases and LoRAs


def register_folder() -> None:
    """Add `models/osediff/` as ComfyUI model folder kind `osediff` (kept when extra_model_paths.yaml,
    read before custom nodes, already declared the kind)."""
    default = os.path.join(folder_paths.models_dir, FOLDER_KIND)
    if FOLDER_KIND in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER_KIND, default)
    else:
        folder_paths.folder_names_and_paths[FOLDER_KIND] = ([default], EXTENSIONS)


def comfy_folder(key: str) -> str:
    """The first ComfyUI folder a weight of kind `key` belongs in (for messages)."""
    kind = "diffusers" if key == "base" else FOLDER_KIND
    paths = folder_paths.get_folder_paths(kind)
    return paths[0] if paths else os.path.join(folder_paths.models_dir, kind)


# --- what the UI lists --------------------------------------------------------------------------------------
def base_choices() -> list[str]:
    """Diffusers folders (relative to `models/diffusers/`), SD 2.1-base single files (ComfyUI names in
    `models/checkpoints/`) + osediff's own SD folder, the default name first."""
    found = []
    for root in folder_paths.get_folder_paths("diffusers"):
        if os.path.isdir(root):
            for folder, _dirs, files in os.walk(root, followlinks=True):
                if "model_index.json" in files:
                    found.append(os.path.relpath(folder, root))
    found += _kind_files(CHECKPOINTS, _is_sd21_base)
    found += [n for n in wts.SPECS["base"].names if (wts.models_dir() / n).is_dir()]
    return _with_default(found, wts.SPECS["base"].names[0])


def file_choices(key: str) -> list[str]:
    """Files of models/osediff/ (+ OSEDiff LoRAs of models/loras/ for `weights`) + osediff's models folder for
    `key` in weights/ram/dape; `none` last for the tagger's two files."""
    found = list(folder_paths.get_filename_list(FOLDER_KIND))
    if key == "weights":
        found += _kind_files(LORAS, _is_osediff)
    found += [n for n in wts.SPECS[key].names if (wts.models_dir() / n).is_file()]
    choices = _with_default(found, _default_name(key))
    return choices + [NONE] if key in ("ram", "dape") else choices


def _kind_files(kind: str, accept) -> list[str]:
    """The ComfyUI names of the files of folder kind `kind` whose full path `accept`s (none if ComfyUI does not
    know the kind)."""
    if kind not in folder_paths.folder_names_and_paths:
        return []
    found = []
    for name in folder_paths.get_filename_list(kind):
        path = folder_paths.get_full_path(kind, name)
        if path and _checked(accept, path):
            found.append(name)
    return found


def _checked(accept, path: str) -> bool:
    st = os.stat(path)  # the lists are rebuilt on every page load: each file is judged once per version
    return _verdict(accept, os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _verdict(accept, path: str, size: int, mtime_ns: int) -> bool:
    return accept(path)


def _is_sd21_base(path: str) -> bool:
    return Path(path).suffix.lower() in SUFFIXES and looks_like_sd21_base(path)


def _is_osediff(path: str) -> bool:
    if Path(path).suffix.lower() not in EXTENSIONS:
        return False
    try:
        check_osediff(path)
        return True
    except Exception as e:  # noqa: BLE001 — any file may sit in models/loras; one that is not ours is left out
        log.debug("%s is not OSEDiff weights: %s", path, e)
        return False


def _default_name(key: str) -> str:
    # the pickle the authors release, not the safetensors the converter writes
    return "osediff.pkl" if key == "weights" else wts.SPECS[key].names[0]


def _with_default(names: list[str], default: str) -> list[str]:
    rest = sorted(set(names) - {default})
    return [default] + rest


# --- from a UI choice to a path -----------------------------------------------------------------------------
def locate(key: str, name: str) -> str | None:
    """The path of the weight chosen as `name` for `key` (base/weights/ram/dape); None for `none`.

    Raises `MissingWeightsError` with the CLI's message plus where ComfyUI looks when it is nowhere.
    """
    if name == NONE and key in ("ram", "dape"):
        return None
    candidates = []
    if key == "base":
        candidates += [os.path.join(r, name) for r in folder_paths.get_folder_paths("diffusers")]
        if Path(name).suffix.lower() in SUFFIXES:
            candidates.append(_full_path(CHECKPOINTS, name))
    else:
        candidates.append(folder_paths.get_full_path(FOLDER_KIND, name))
        if key == "weights":
            candidates.append(_full_path(LORAS, name))
    candidates.append(str(wts.models_dir() / name))
    for c in candidates:
        if c and os.path.exists(c):
            return c
    if name == _default_name(key) or name in wts.SPECS[key].names:
        env = os.environ.get(wts.SPECS[key].env)
        if env and Path(env).expanduser().exists():
            return str(Path(env).expanduser())
    where = {"base": f"{comfy_folder(key)}/ (a diffusers folder) or {_first_folder(CHECKPOINTS)} (one file)",
             "weights": f"{comfy_folder(key)} or {_first_folder(LORAS)}"}.get(key, comfy_folder(key))
    raise wts.MissingWeightsError(
        wts.missing_message(key) + f"\n  In ComfyUI you can also put it in {where} and pick it in the "
        "OSEDiffLoader node.")


def _first_folder(kind: str) -> str:
    paths = folder_paths.folder_names_and_paths.get(kind, ([],))[0]
    return paths[0] if paths else os.path.join(folder_paths.models_dir, kind)


def _full_path(kind: str, name: str) -> str | None:
    if kind not in folder_paths.folder_names_and_paths:
        return None
    return folder_paths.get_full_path(kind, name)


# --- the pipeline, loaded once --------------------------------------------------------------------------------
_cache: dict[tuple, object] = {}


def load_pipeline(base: str, weights: str, ram: str, dape: str, dtype: str, device: str):
    """`OSEDiffPipeline.from_pretrained` on the located files (`dtype` fp16/bf16/fp32, built on `device`, the
    offload device), cached across prompts.

    The cache is what lets ComfyUI evict the model and the next prompt load it again without reading a file:
    the evicted modules wait here, on the offload device (RAM). One pipeline is kept (the last one asked for):
    a second, different OSEDiffLoader replaces it rather than holding two copies of SD 2.1 in memory. A file
    replaced on disk (new mtime) reloads.
    """
    from osediff.core.pipeline import DTYPES, OSEDiffPipeline

    paths = {k: locate(k, v) for k, v in (("base", base), ("weights", weights), ("ram", ram), ("dape", dape))}
    if (paths["ram"] is None) != (paths["dape"] is None):
        raise ValueError("ram and dape work together (RAM is the tagger, DAPE its LoRA): choose both files, or "
                         "`none` for both to run without tags")
    key = (tuple((k, p, _mtime(p)) for k, p in paths.items()), dtype, device)
    if key not in _cache:
        _cache.clear()
        # the old modules and their ModelPatchers reference each other: collect them now, so their memory is
        # back before the new one is built and ComfyUI drops them from its list (it holds them weakly)
        gc.collect()
        use_dape = paths["ram"] is not None
        if not use_dape:
            log.warning("OSEDiff runs without DAPE tags (ram/dape set to none): outputs differ from the published "
                        "ones unless tags are given to the OSEDiffUpscale node")
        # a torch dtype, not its name: built on the CPU for a GPU, so the CPU's own bf16 advice does not apply
        _cache[key] = OSEDiffPipeline.from_pretrained(
            paths["base"], paths["weights"], device=device, dtype=DTYPES[dtype], ram=paths["ram"],
            dape=paths["dape"], use_dape=use_dape)
    return _cache[key]


def _mtime(path: str | None) -> float | None:
    return os.path.getmtime(path) if path else None
