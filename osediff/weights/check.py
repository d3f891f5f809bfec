"""Is a weight on disk what it claims to be? A structural check of each kind, cheap enough to run at every load.

Files are opened safely: pickles with `torch.load(weights_only=True, mmap=True)` (no code runs, tensors are
memory-mapped, not read), safetensors by their JSON header alone. What each kind must hold:
- `weights` / `face` (osediff.pkl or our .safetensors): the eight entries of spec §3.1; exactly the LoRA
  tensors its own target lists name (`layout.expected_state_keys`) with rank-r shapes; and, given the base
  folder, the target lists and shapes that the reference's selection rule derives from that base's tensor names
  (spec §2.2, §2.3), so LoRA trained for another base is caught before any merge;
- `base`: a diffusers folder (unet, vae, text_encoder, tokenizer) whose safetensors are complete and hold the
  tensors their configs describe, and which is not SD 2.1 (768 px, v-prediction; OSEDiff issue #65);
- `ram`: RAM's `{"model": state dict}` with the Swin-L image encoder, `image_proj`, `label_embed` and the tagging
  head (`tagging_head.*` or its published name `vision_multi.*`) that tagging uses (spec Appendix B);
- `dape`: a plain state dict carrying loralib LoRA pairs on the Swin `qkv` layers (spec Appendix B).
`check()` adds the checksum verdict for `osediff download --check`: `ok (published)` / `ok (custom)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from osediff.weights import layout


class BrokenWeightsError(ValueError):
    """A weight file exists but is not what it should be; the message is one line saying why."""


@dataclass(frozen=True)
class Verdict:
    key: str
    path: str | None
    status: str  # "ok (published)", "ok (custom)", "ok (no published checksum)", "MISSING", "BROKEN: <why>"

    @property
    def ok(self) -> bool:
        return self.status.startswith("ok")

    def line(self) -> str:
        return f"{self.key:8} {self.status}" + (f"  {self.path}" if self.path else "")


def blob_sha1(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Git's blob id of a file: sha1(b"blob <size>\\0" + content), streamed."""
    p = Path(path)
    h = hashlib.sha1(b"blob %d\0" % p.stat().st_size)
    with open(p, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ readers

def safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors header; BrokenWeightsError if the file is cut short or not one."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise BrokenWeightsError(f"{path.name} is not a safetensors file or is truncated ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise BrokenWeightsError(f"{path.name}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise BrokenWeightsError(f"{path.name} is truncated: {size:,} bytes, its header needs {8 + n + end:,}")
    return {k: tuple(v["shape"]) for k, v in header.items()}


def torch_load(path: Path):
    """A pickle read with weights_only=True (never runs code) and memory-mapped where the format allows."""
    import torch

    if path.stat().st_size == 0:
        raise BrokenWeightsError(f"{path.name} is empty")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # mmap needs the zip format; legacy pickles load without it
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).splitlines() or [""])[0].split(". ")[0][:160]
        raise BrokenWeightsError(f"{path.name} is truncated or not a PyTorch checkpoint ({type(e).__name__}: "
                                 f"{first})") from None


def _shape(t) -> tuple[int, ...]:
    return tuple(t.shape)


def _is_state_dict(obj) -> bool:
    import torch

    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _kind_hint(obj) -> str:
    """What a checkpoint of the wrong kind looks like, for the one-line reason."""
    if isinstance(obj, Mapping) and "state_dict_unet" in obj:
        return " (it looks like OSEDiff weights, osediff.pkl)"
    if isinstance(obj, Mapping) and "model" in obj:
        return " (it looks like a RAM checkpoint)"
    if _is_state_dict(obj) and any(k.endswith((".lora_A", ".lora_B")) for k in obj):
        return " (it looks like DAPE.pth)"
    return ""


# ------------------------------------------------------------------------------------------- OSEDiff weights

def _read_osediff(path: Path) -> dict:
    """The authors' dict (spec §3.1) from osediff.pkl, or its equivalent from our safetensors (shapes only)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) > 8 and head[8:9] == b"{":
        shapes = safetensors_header(path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "osediff":
            raise BrokenWeightsError(f"{path.name} is a safetensors file but not an osediff checkpoint")
        h = json.loads(meta["osediff"])
        d = {layout.AUTHORS_LIST_KEYS[a]: h["unet_targets"][a] for a in layout.UNET_ADAPTERS}
        d.update(vae_lora_encoder_modules=h["vae_targets"], rank_unet=h["rank_unet"], rank_vae=h["rank_vae"],
                 state_dict_unet={k[5:]: s for k, s in shapes.items() if k.startswith("unet.")},
                 state_dict_vae={k[4:]: s for k, s in shapes.items() if k.startswith("vae.")})
        return d
    d = torch_load(path)
    if not isinstance(d, Mapping) or any(k not in d for k in layout.AUTHORS_KEYS):
        raise BrokenWeightsError(f"{path.name} is not OSEDiff weights: no {', '.join(layout.AUTHORS_KEYS[:1])}"
                                 f"/state_dict_unet entries{_kind_hint(d)}")
    if not (_is_state_dict(d["state_dict_unet"]) and _is_state_dict(d["state_dict_vae"])):
        raise BrokenWeightsError(f"{path.name}: state_dict_unet / state_dict_vae are not dicts of tensors")
    return {**d, "state_dict_unet": {k: _shape(v) for k, v in d["state_dict_unet"].items()},
            "state_dict_vae": {k: _shape(v) for k, v in d["state_dict_vae"].items()}}


def _diff(what: str, expected: set[str], got: set[str]) -> None:
    missing, extra = sorted(expected - got), sorted(got - expected)
    if missing or extra:
        parts = ([f"lacks {len(missing)} (e.g. {missing[0]})"] if missing else []) + (
            [f"has {len(extra)} unexpected (e.g. {extra[0]})"] if extra else [])
        raise BrokenWeightsError(f"{what} {' and '.join(parts)}")


def check_osediff(path: str | os.PathLike, base: str | os.PathLike | None = None) -> None:
    """Raise BrokenWeightsError unless `path` is OSEDiff weights (for the SD 2.1-base folder `base`, if given)."""
    path = Path(path)
    d = _read_osediff(path)
    targets = {a: list(d[k]) for a, k in layout.AUTHORS_LIST_KEYS.items()}
    vae_targets = list(d["vae_lora_encoder_modules"])
    ranks = d["rank_unet"], d["rank_vae"]
    if not all(isinstance(r, int) and r > 0 for r in ranks):
        raise BrokenWeightsError(f"{path.name}: ranks {ranks} are not positive integers")
    unet_keys, vae_keys = layout.expected_state_keys(targets, layout.unique(vae_targets))
    _diff(f"{path.name}: UNet state", unet_keys, set(d["state_dict_unet"]))
    _diff(f"{path.name}: VAE state", vae_keys, set(d["state_dict_vae"]))
    for state, rank in ((d["state_dict_unet"], ranks[0]), (d["state_dict_vae"], ranks[1])):
        for k, s in state.items():
            if ".lora_A." in k and (len(s) not in (2, 4) or s[0] != rank):
                raise BrokenWeightsError(f"{path.name}: {k} has shape {s}, expected rank {rank} first")
            if ".lora_B." in k and (len(s) not in (2, 4) or s[1] != rank or s[2:] not in ((), (1, 1))):
                raise BrokenWeightsError(f"{path.name}: {k} has shape {s}, expected [out, {rank}(, 1, 1)]")
    if base is not None:
        _fits_base(path.name, d, targets, vae_targets, ranks, Path(base))


def _fits_base(name: str, d: dict, targets, vae_targets, ranks, base: Path) -> None:
    """The targets and shapes the reference's rule derives from the base's own tensors (spec §2.2, §2.3)."""
    if base.is_file():  # a single-file base: its UNet/VAE names and shapes through the LDM key map
        from osediff.weights import ldm
        from osediff.weights.single_file import load_configs

        converted, _ = ldm.converted_shapes(ldm.ldm_shapes(base), load_configs())
        unet, vae = converted["unet"], converted["vae"]
        return _fits_shapes(name, d, targets, vae_targets, ranks, base, unet, vae)
    unet_file, vae_file = _weights_file(base / "unet"), _weights_file(base / "vae")
    if unet_file is None or vae_file is None or unet_file.suffix != ".safetensors" or vae_file.suffix != ".safetensors":
        return  # a .bin base can only be checked by loading it; load_base does that
    unet, vae = safetensors_header(unet_file), safetensors_header(vae_file)
    _fits_shapes(name, d, targets, vae_targets, ranks, base, unet, vae)


def _fits_shapes(name: str, d: dict, targets, vae_targets, ranks, base: Path, unet: dict, vae: dict) -> None:
    for adapter, modules in layout.unet_targets(unet).items():
        if set(modules) != set(targets[adapter]):
            raise BrokenWeightsError(f"{name} was trained for another base model: its {adapter} targets "
                                     f"({len(set(targets[adapter]))}) are not the {len(set(modules))} of {base}")
    if Counter(layout.vae_targets(vae)) != Counter(vae_targets):
        raise BrokenWeightsError(f"{name} was trained for another base model: its VAE targets differ from {base}'s")
    for state, shapes, mods, rank, adapters in (
            (d["state_dict_unet"], unet, targets, ranks[0], layout.UNET_ADAPTERS),
            (d["state_dict_vae"], vae, {layout.VAE_ADAPTER: vae_targets}, ranks[1], (layout.VAE_ADAPTER,))):
        for adapter in adapters:
            for m in layout.unique(mods[adapter]):
                a, b = layout.lora_shapes(shapes[f"{m}.weight"], rank)
                got = state[f"{m}.lora_A.{adapter}.weight"], state[f"{m}.lora_B.{adapter}.weight"]
                if got != (a, b):
                    raise BrokenWeightsError(f"{name}: LoRA of {m} has shapes {got[0]}/{got[1]}, {base.name} needs "
                                             f"{a}/{b}; is the base model SD 2.1-base?")
    if d["state_dict_unet"]["conv_in.base_layer.weight"] != unet["conv_in.weight"]:
        raise BrokenWeightsError(f"{name}: conv_in does not fit {base.name}'s UNet")


# ------------------------------------------------------------------------------------------------- the base

def _weights_file(folder: Path) -> Path | None:
    """The weight file of one network: fp32 before an `*.fp16.*` variant, and only files that exist (a link
    into a Hugging Face cache may point at a blob that was never downloaded)."""
    for pattern in ("*.safetensors", "*.bin"):
        found = sorted((p for p in folder.glob(pattern) if p.is_file()), key=lambda p: (".fp16." in p.name, p.name))
        if found:
            return found[0]
    return None


def _config(folder: Path, name: str = "config.json") -> dict:
    p = folder / name
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise BrokenWeightsError(f"{p.parent.name}/{p.name} is missing or unreadable ({type(e).__name__})") from None


def check_base(path: str | os.PathLike) -> None:
    """Raise BrokenWeightsError unless `path` is a complete SD 2.1-base-like diffusers folder (not SD 2.1 768),
    or an SD 2.1-base single file (`weights.single_file.identify`)."""
    path = Path(path)
    if path.is_file():
        from osediff.weights.single_file import identify

        identify(path)
        return
    missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer") if not (path / s).is_dir()]
    if missing:
        raise BrokenWeightsError(f"{path.name} is not a diffusers SD folder: missing {', '.join(missing)}/")
    unet_cfg, vae_cfg, text_cfg = (_config(path / s) for s in ("unet", "vae", "text_encoder"))
    sched = path / "scheduler" / "scheduler_config.json"
    prediction = json.loads(sched.read_text()).get("prediction_type", "epsilon") if sched.is_file() else "epsilon"
    if unet_cfg.get("sample_size") == 96 or prediction == "v_prediction":
        raise BrokenWeightsError(f"{path.name} is SD 2.1 (768 px, v-prediction: sample_size "
                                 f"{unet_cfg.get('sample_size')}, {prediction}); OSEDiff needs SD 2.1-base (512 px, "
                                 "epsilon)")
    if unet_cfg.get("in_channels") != 4 or vae_cfg.get("latent_channels") != 4:
        raise BrokenWeightsError(f"{path.name}: UNet in_channels {unet_cfg.get('in_channels')} / VAE latent "
                                 f"channels {vae_cfg.get('latent_channels')}, SD 2.1-base has 4 / 4")
    if unet_cfg.get("cross_attention_dim") != text_cfg.get("hidden_size"):
        raise BrokenWeightsError(f"{path.name}: the text encoder (width {text_cfg.get('hidden_size')}) does not "
                                 f"fit the UNet (cross-attention {unet_cfg.get('cross_attention_dim')})")
    tok = path / "tokenizer"
    if not ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()) and not (tok / "tokenizer.json").is_file():
        raise BrokenWeightsError(f"{path.name}/tokenizer has neither vocab.json + merges.txt nor tokenizer.json")
    for sub, build in (("unet", _meta_unet), ("vae", _meta_vae), ("text_encoder", _meta_text)):
        f = _weights_file(path / sub)
        if f is None:
            raise BrokenWeightsError(f"{path.name}/{sub} has no weights (*.safetensors or *.bin)")
        if f.suffix == ".safetensors":
            got, want = safetensors_header(f), build(_config(path / sub))
            _diff(f"{path.name}/{sub}/{f.name}", set(want), set(got))
            wrong = [k for k, s in want.items() if got[k] != s]
            if wrong:
                raise BrokenWeightsError(f"{path.name}/{sub}: {wrong[0]} has shape {got[wrong[0]]}, its config "
                                         f"says {want[wrong[0]]}")


def _meta_shapes(make) -> dict[str, tuple[int, ...]]:
    import torch

    with torch.device("meta"):
        model = make()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _meta_unet(cfg: dict) -> dict[str, tuple[int, ...]]:
    from diffusers import UNet2DConditionModel

    return _meta_shapes(lambda: UNet2DConditionModel.from_config(cfg))


def _meta_vae(cfg: dict) -> dict[str, tuple[int, ...]]:
    from diffusers import AutoencoderKL

    return _meta_shapes(lambda: AutoencoderKL.from_config(cfg))


def _meta_text(cfg: dict) -> dict[str, tuple[int, ...]]:
    from transformers import CLIPTextConfig, CLIPTextModel

    shapes = _meta_shapes(lambda: CLIPTextModel(CLIPTextConfig.from_dict(cfg)))
    shapes.pop("text_model.embeddings.position_ids", None)  # a non-persistent buffer in recent transformers
    return shapes


# --------------------------------------------------------------------------------------------- RAM and DAPE

_SWIN_QKV = re.compile(r"visual_encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.weight")
RAM_TENSORS = ("visual_encoder.patch_embed.proj.weight", "visual_encoder.norm.weight", "image_proj.weight",
               "label_embed", "wordvec_proj.weight", "fc.weight")
RAM_HEAD = ("encoder.layer.0.crossattention.self.query.weight", "encoder.layer.0.crossattention.self.key.weight",
            "encoder.layer.0.output.dense.weight")


def check_ram(path: str | os.PathLike) -> None:
    """Raise BrokenWeightsError unless `path` is RAM's checkpoint with what tagging needs (spec Appendix B).

    The shapes are checked against each other (image_proj ↔ Swin width ↔ label_embed ↔ fc); the full
    comparison with the Swin-L configuration is `RAMTagger.from_files`'s, which reads every tensor."""
    path = Path(path)
    ckpt = torch_load(path)
    model = ckpt.get("model") if isinstance(ckpt, Mapping) else None
    if not _is_state_dict(model):
        raise BrokenWeightsError(f"{path.name} is not a RAM checkpoint: no `model` state dict{_kind_hint(ckpt)}")
    head = "tagging_head" if f"tagging_head.{RAM_HEAD[0]}" in model else "vision_multi"
    need = [*RAM_TENSORS, *(f"{head}.{k}" for k in RAM_HEAD)]
    lacking = [k for k in need if k not in model]
    blocks = Counter(int(m.group(1)) for k in model if (m := _SWIN_QKV.fullmatch(k)))
    if lacking or len(blocks) != 4:
        what = lacking[0] if lacking else f"Swin stages ({len(blocks)} of 4)"
        raise BrokenWeightsError(f"{path.name} lacks RAM tagging weights, e.g. {what}")
    width = _shape(model["visual_encoder.norm.weight"])[0]
    embed = _shape(model["label_embed"])[1]
    if _shape(model["image_proj.weight"]) != (embed, width) or _shape(model["fc.weight"])[0] != 1:
        raise BrokenWeightsError(f"{path.name}: image_proj {_shape(model['image_proj.weight'])} does not connect the "
                                 f"Swin width {width} to the label width {embed}")


def check_dape(path: str | os.PathLike) -> None:
    """Raise BrokenWeightsError unless `path` is a plain state dict with loralib LoRA on Swin's qkv (App. B)."""
    path = Path(path)
    sd = torch_load(path)
    if not _is_state_dict(sd) or "model" in sd:
        raise BrokenWeightsError(f"{path.name} is not DAPE.pth (a plain state dict of tensors){_kind_hint(sd)}")
    pairs = {k[: -len(".lora_A")] for k in sd if k.endswith(".lora_A")}
    qkv = sorted(m for m in pairs if _SWIN_QKV.fullmatch(f"{m}.weight"))
    if not qkv:
        raise BrokenWeightsError(f"{path.name} holds no LoRA on the Swin qkv layers (`*.attn.qkv.lora_A`)")
    for m in pairs:
        a, b = sd.get(f"{m}.lora_A"), sd.get(f"{m}.lora_B")
        if b is None or a.ndim != 2 or b.ndim != 2:
            raise BrokenWeightsError(f"{path.name}: LoRA of {m} is incomplete or not 2-D")
        groups = 2 if m.endswith(".qkv") else 1  # MergedLinear on q and v: A [2r, in], B [2·dim, r]
        if a.shape[0] != groups * b.shape[1]:
            raise BrokenWeightsError(f"{path.name}: LoRA of {m}: A {tuple(a.shape)} and B {tuple(b.shape)} "
                                     "have different ranks")


# --------------------------------------------------------------------------------------------- one verdict

def verify(key: str, path: str | os.PathLike, base: str | os.PathLike | None = None) -> None:
    """The structural check of one weight kind; raises BrokenWeightsError with a one-line reason."""
    if key in ("weights", "face"):
        check_osediff(path, base)
    elif key == "base":
        check_base(path)
    elif key == "ram":
        check_ram(path)
    elif key == "dape":
        check_dape(path)
    else:
        raise KeyError(key)


def check(key: str, path: str | os.PathLike | None, base: str | os.PathLike | None = None,
          published_sha1: str | None = None) -> Verdict:
    """`osediff download --check` for one weight: MISSING, BROKEN: why, or ok with the checksum verdict."""
    if path is None or not Path(path).exists():
        return Verdict(key, None if path is None else str(path), "MISSING")
    try:
        verify(key, path, base)
    except BrokenWeightsError as e:
        return Verdict(key, str(path), f"BROKEN: {e}")
    if key == "base" and Path(path).is_file():  # identified by sha256 (cached) or by structure
        from osediff.weights.single_file import identify

        return Verdict(key, str(path), identify(path).status)
    if published_sha1 is None or Path(path).is_dir():
        return Verdict(key, str(path), "ok (no published checksum)")
    same = blob_sha1(path) == published_sha1
    return Verdict(key, str(path), "ok (published)" if same else "ok (custom)")
