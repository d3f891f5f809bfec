"""Is this single file SD 2.1-base? The check behind `--base FILE`, `osediff download --check` and the ComfyUI
checkpoint list.

SD 2.1-base (512 px, epsilon) and SD 2.1 (768 px, v-prediction) have identical tensor shapes, so the file is
identified, in this order, by
1. its sha256 against the published files (`PUBLISHED`; the digest is cached by path, size and mtime in
   `<models folder>/.sha256-cache.json`, since hashing 5 GB takes seconds);
2. a sibling `<name>.yaml` (the LDM config A1111 reads): `parameterization: "v"` is the 768 model;
3. its safetensors metadata: `modelspec.predict_key` ("epsilon" / "v", written by ComfyUI when it saves a
   checkpoint) or a `modelspec.architecture` naming a 768-v model;
4. else a weight statistic: in v-prediction models the first `norm1.bias` of the last output block's
   transformer has a standard deviation above 0.09 (ComfyUI's own test), which gives a warning only.
SD 1.x, SDXL, inpainting (9 input channels) and files that are not checkpoints are refused from their tensor
names and shapes, and the rest is compared shape by shape with the diffusers configs (`weights.sd21`, or the
folder in `$OSEDIFF_BASE_CONFIG`) through the key map of `weights.ldm`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from osediff.weights import ldm, sd21
from osediff.weights.check import BrokenWeightsError

log = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".ckpt")
# sha256 -> (published name, usable). The two non-EMA digests were matched to their names from a hash list,
# not checked against the files here (no network).
PUBLISHED = {
    "df955bdf6b682338ea9b55dfc0d8f3475aadf4836e204893d28b82355e0956d2": ("v2-1_512-ema-pruned.safetensors", True),
    "88ecb782561455673c4b78d05093494b9c539fc6bfc08f3a9a4a0dd7b0b10f36": ("v2-1_512-ema-pruned.ckpt", True),
    "34dccb9e60d83a4ef963f51e9ff63548323a70024f8679095956d7c403b3ef4a": ("v2-1_512-nonema-pruned.ckpt", True),
    "fc4f9fe7528b2ee3de21971fb805bbf74d680bf1ab5b5f9c08379b0397b82a9d": ("v2-1_512-nonema-pruned.safetensors", True),
    "dcd690123cfc64383981a31d955694f6acf2072a80537fdb612c8e58ec87a8ac": ("v2-1_768-ema-pruned.safetensors", False),
}
PUBLISHED_NAMES = tuple(name for name, ok in PUBLISHED.values() if ok)
V_STD_THRESHOLD = 0.09
_768 = "SD 2.x 768 (v-prediction); OSEDiff needs SD 2.1-base (512 px, epsilon)"


@dataclass(frozen=True)
class Identity:
    """What a single file was found to be. `published`: the name whose sha256 it has, else None."""

    path: str
    published: str | None
    how: str  # how it was recognised, for messages
    warning: str | None = None

    @property
    def status(self) -> str:
        """`osediff download --check`'s verdict for a usable file."""
        if self.published:
            return "ok (published)"
        return f"ok (SD 2.x-base single file by {self.how}; not a published checksum" + (
            f"; WARNING: {self.warning})" if self.warning else ")")


# --------------------------------------------------------------------------------------------------- digests

def _digest_cache() -> Path:
    from osediff.weights.locate import models_dir

    return models_dir() / ".sha256-cache.json"


def _read_cache() -> dict:
    try:
        return json.loads(_digest_cache().read_text())
    except (OSError, ValueError):
        return {}


def cached_sha256(path: str | os.PathLike) -> str | None:
    """The cached digest of `path` if its size and mtime are unchanged since it was hashed, else None."""
    p = Path(path).resolve()
    st = p.stat()
    hit = _read_cache().get(str(p))
    if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return hit["sha256"]
    return None


def sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The file's sha256, from the cache when the file is unchanged, else computed (streamed) and cached."""
    hit = cached_sha256(path)
    if hit:
        return hit
    p = Path(path).resolve()
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    cache = _read_cache()
    cache[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:  # a cache that cannot be written costs only time
        target = _digest_cache()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=0))
        os.replace(tmp, target)
    except OSError as e:
        log.debug("sha256 cache not written: %s", e)
    return digest


# ------------------------------------------------------------------------------------------------ the configs

def load_configs(folder: str | os.PathLike | None = None) -> dict[str, dict]:
    """{"unet", "vae", "text_encoder": config dict}: from a diffusers folder (`folder`, else `$OSEDIFF_BASE_CONFIG`)
    when given, else the carried SD 2.1-base configs."""
    folder = folder or os.environ.get("OSEDIFF_BASE_CONFIG")
    if not folder:
        return {"unet": dict(sd21.UNET), "vae": dict(sd21.VAE), "text_encoder": dict(sd21.TEXT)}
    folder = Path(folder).expanduser()
    try:
        return {sub: json.loads((folder / sub / "config.json").read_text()) for sub in ldm.COMPONENTS}
    except (OSError, ValueError) as e:
        raise BrokenWeightsError(f"OSEDIFF_BASE_CONFIG={folder}: no readable unet/vae/text_encoder config.json "
                                 f"({type(e).__name__})") from None


def load_tokenizer(folder: str | os.PathLike | None = None):
    """The CLIP tokenizer for a single-file base: `<config folder>/tokenizer` when one is set, else SD 2.x's."""
    folder = folder or os.environ.get("OSEDIFF_BASE_CONFIG")
    if folder:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(Path(folder).expanduser() / "tokenizer"))
    return sd21.load_tokenizer()


def expected_shapes(configs: dict[str, dict]) -> dict[str, dict[str, tuple[int, ...]]]:
    """{component: {diffusers name: shape}} of the three networks the configs describe (built on `meta` once
    per configs: listing a folder of checkpoints asks for them once per file)."""
    return _expected_shapes(json.dumps(configs, sort_keys=True))


@functools.lru_cache(maxsize=4)
def _expected_shapes(configs_json: str) -> dict[str, dict[str, tuple[int, ...]]]:
    from osediff.weights.check import _meta_text, _meta_unet, _meta_vae

    configs = json.loads(configs_json)

    text = {k.removeprefix("text_model."): s for k, s in _meta_text(configs["text_encoder"]).items()}
    return {"unet": _meta_unet(configs["unet"]), "vae": _meta_vae(configs["vae"]), "text_encoder": text}


# ------------------------------------------------------------------------------------------- what the file is

def architecture_problem(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why these LDM tensors are not an SD 2.x-base-shaped checkpoint (one line), or None."""
    keys = shapes.keys()
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("conditioner.embedders.") or f"{ldm.UNET_PREFIX}label_emb.0.0.weight" in shapes:
        return "is SDXL (conditioner.embedders / label_emb); OSEDiff needs SD 2.1-base"
    if not has(ldm.UNET_PREFIX):
        if any("lora" in k for k in keys):
            return "is a LoRA, not a Stable Diffusion checkpoint"
        if has("encoder.") and has("decoder."):
            return "is a VAE alone, not a Stable Diffusion checkpoint"
        if has("down_blocks.") or has("text_model."):
            return "is one network in the diffusers layout; pass the whole diffusers folder instead"
        return "has no model.diffusion_model.* tensors: not a Stable Diffusion checkpoint"
    if has("cond_stage_model.transformer."):
        return "is SD 1.x (CLIP ViT-L text encoder, cross-attention 768); OSEDiff needs SD 2.1-base"
    conv_in = shapes.get(f"{ldm.UNET_PREFIX}input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        return "has no UNet input convolution (model.diffusion_model.input_blocks.0.0.weight)"
    if conv_in[1] != 4:
        what = {9: "an inpainting model", 5: "a depth-to-image model", 7: "the x4 upscaler"}.get(
            conv_in[1], "not a text-to-image model")
        return f"is {what} (its UNet takes {conv_in[1]} input channels, SD 2.1-base 4)"
    if not has(ldm.VAE_PREFIX):
        return "has no VAE (first_stage_model.*)"
    if not has(f"{ldm.TEXT_PREFIX}transformer.resblocks."):
        return "has no OpenCLIP text encoder (cond_stage_model.model.*)"
    width = shapes.get(f"{ldm.TEXT_PREFIX}token_embedding.weight", (0, 0))[-1]
    to_k = [s for k, s in shapes.items() if k.endswith("attn2.to_k.weight")]
    if not to_k or any(s[-1] != width for s in to_k):
        return f"its UNet cross-attention ({to_k[0][-1] if to_k else 'none'}) does not fit its text encoder ({width})"
    return None


def structure_problem(shapes: dict[str, tuple[int, ...]], configs: dict[str, dict]) -> str | None:
    """Why LDM tensors do not build the networks of `configs` name for name and shape for shape (the rest of
    a one-line message after the file name), or None."""
    got, unknown = ldm.converted_shapes(shapes, configs)
    if unknown:
        return f" has {len(unknown)} tensors SD 2.1-base does not (e.g. {unknown[0]})"
    for comp, want in expected_shapes(configs).items():
        missing, extra = sorted(set(want) - set(got[comp])), sorted(set(got[comp]) - set(want))
        if missing or extra:
            what = (f"lacks {len(missing)} tensors SD 2.1-base has (e.g. {missing[0]})" if missing else
                    f"has {len(extra)} tensors SD 2.1-base does not (e.g. {extra[0]})")
            return f": its {comp} {what}"
        wrong = [k for k, s in want.items() if got[comp][k] != s]
        if wrong:
            return f": {comp} {wrong[0]} has shape {got[comp][wrong[0]]}, SD 2.1-base {want[wrong[0]]}"
    return None


def _metadata(path: Path) -> dict[str, str]:
    if not ldm.is_safetensors(path):
        return {}
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        try:
            return dict(json.loads(f.read(n)).get("__metadata__") or {})
        except ValueError:
            return {}


def declared_prediction(path: str | os.PathLike) -> tuple[str | None, str]:
    """("v" / "epsilon" / None, where that was read): the sibling .yaml, then the safetensors metadata."""
    path = Path(path)
    for yaml in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if yaml.is_file():
            m = re.search(r"^\s*parameterization:\s*['\"]?(\w+)['\"]?\s*$", yaml.read_text(errors="replace"), re.M)
            return ("v" if m and m.group(1) == "v" else "epsilon"), f"{yaml.name} (parameterization)"
    meta = _metadata(path)
    key = meta.get("modelspec.predict_key", "").strip().lower()
    if key:
        return ("v" if key in ("v", "v_prediction", "v-prediction") else "epsilon"), "modelspec.predict_key"
    arch = meta.get("modelspec.architecture", "").lower()
    if arch.startswith("stable-diffusion-v2"):
        return ("v" if arch.endswith("-v") else "epsilon"), "modelspec.architecture"
    return None, ""


def v_statistic(path: str | os.PathLike, shapes: dict[str, tuple[int, ...]]) -> float | None:
    """std of the first transformer norm1.bias of the last output block (SD 2.x: output_blocks.11.1), or None."""
    found = [k for k in shapes if re.fullmatch(
        re.escape(ldm.UNET_PREFIX) + r"output_blocks\.\d+\.1\.transformer_blocks\.0\.norm1\.bias", k)]
    if not found:
        return None
    key = max(found, key=lambda k: int(k.split(".")[3]))
    if ldm.is_safetensors(path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:  # maps the file; reads one small tensor
            t = f.get_tensor(key)
    else:
        t = ldm.ckpt_state(path)[key]
    return float(t.float().std())


def looks_like_sd21_base(path: str | os.PathLike) -> bool:
    """Cheap: True for a .safetensors/.ckpt whose tensor names and shapes are an SD 2.x-base-shaped checkpoint
    and that is not known to be the 768 v-prediction model (cached sha256, sibling .yaml, metadata). Reads the
    safetensors header, or a zip .ckpt's pickle (memory-mapped); never hashes, never raises."""
    p = Path(path)
    try:
        if p.suffix.lower() not in SUFFIXES or not p.is_file():
            return False
        if p.suffix.lower() == ".ckpt":
            import zipfile

            if not zipfile.is_zipfile(p):  # a legacy pickle could only be judged by reading it whole
                return False
        shapes = ldm.ldm_shapes(p)
        if architecture_problem(shapes) is not None or structure_problem(shapes, load_configs()) is not None:
            return False
        digest = cached_sha256(p)
        if digest in PUBLISHED:
            return PUBLISHED[digest][1]
        return declared_prediction(p)[0] != "v"
    except (OSError, ValueError, KeyError, BrokenWeightsError) as e:
        log.debug("%s: %s", p, e)
        return False


def identify(path: str | os.PathLike, *, configs: dict[str, dict] | None = None, hash: bool = True) -> Identity:
    """The full check of a single-file base: raises BrokenWeightsError (one line) for other architectures, a
    file that does not fit the configs shape for shape, or the 768 v-prediction model; see the module
    docstring for the order. `hash=False` skips the sha256 (then a published file is known only by structure)."""
    p = Path(path)
    if p.suffix.lower() not in SUFFIXES:
        raise BrokenWeightsError(f"{p.name}: a single-file base must be .safetensors or .ckpt")
    shapes = ldm.ldm_shapes(p)
    problem = architecture_problem(shapes)
    if problem:
        raise BrokenWeightsError(f"{p.name} {problem}")
    problem = structure_problem(shapes, configs or load_configs())
    if problem:
        raise BrokenWeightsError(f"{p.name}{problem}")
    if hash:
        digest = sha256(p)
        if digest in PUBLISHED:
            name, ok = PUBLISHED[digest]
            if not ok:
                raise BrokenWeightsError(f"{p.name} is {name} by its sha256: {_768}")
            return Identity(str(p), name, "sha256")
    prediction, where = declared_prediction(p)
    if prediction == "v":
        raise BrokenWeightsError(f"{p.name} is {_768} (its {where} says v-prediction)")
    if prediction == "epsilon":
        return Identity(str(p), None, where)
    std = v_statistic(p, shapes)
    warning = None
    if std is not None and std > V_STD_THRESHOLD:
        warning = (f"unrecognised file whose weights look like v-prediction (norm1.bias std {std:.3f} > "
                   f"{V_STD_THRESHOLD}): it may be the 768 model, which OSEDiff cannot use")
        log.warning("%s: %s", p.name, warning)
    return Identity(str(p), None, "structure", warning)
