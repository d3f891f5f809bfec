"""DAPE, OSEDiff's prompt extractor: the RAM Swin-L image tagger with SeeSR's LoRA merged in (spec §1.4, App. B).

Tagging path of `RAMLora.generate_tag`, and nothing else of RAM (its two 12-layer BERTs are never run):

    x       = normalise(resize_bilinear(image, 384))             # (B, 3, 384, 384)
    image   = image_proj(swin(x))                                 # (B, 1 + 144, 512)
    labels  = relu(wordvec_proj(label_embed))                     # (4585, 768), the same for every image
    hidden  = tagging_head(labels, image)                         # 2 BERT layers: cross-attention + FFN
    logits  = fc(hidden).squeeze(-1)                              # (B, 4585)
    tag k on  iff  sigmoid(logits_k) > threshold_k                # per-class thresholds from the RAM release

Weights: RAM's `ram_swin_large_14m.pth` (entry `model`), optionally SeeSR's `DAPE.pth` on top. DAPE's layers are
loralib modules (r = 8, lora_alpha = 1, so scaling 1/8) that the reference merges on `.eval()`; here the same
merge happens once at load (`lora_linear_delta`, `lora_qv_delta`), so inference runs plain Linear layers.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from osediff.dape.swin import SwinTransformer

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RAM_SOURCE = ("download `ram_swin_large_14m.pth` from the Hugging Face model repository "
              "`xinyu1205/recognize_anything_model` and pass its path with `--ram PATH`")
DAPE_SOURCE = ("download `DAPE.pth` (the SeeSR/OSEDiff release; OSEDiff's GitHub repository cswry/OSEDiff ships it "
               "as `preset/models/DAPE.pth`) and pass its path with `--dape PATH`")


@dataclass(frozen=True)
class RAMConfig:
    """The RAM tagger's shapes (spec Appendix B). The defaults are the published Swin-L model at 384."""

    image_size: int = 384
    patch_size: int = 4
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: float = 4.0
    embed_width: int = 512  # image_proj output = label_embed width = the tagging head's encoder_width
    hidden_size: int = 768  # tagging head (BERT) width
    head_layers: int = 2
    head_heads: int = 4
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12  # BERT's; the Swin LayerNorms use torch's default 1e-5
    num_classes: int = 4585
    lora_alpha: float = 1.0  # loralib's default, which DAPE keeps: scaling = lora_alpha / r


# ---------------------------------------------------------------------------------------------- pure functions

def preprocess(images: Tensor, image_size: int, dtype: torch.dtype) -> Tensor:
    """Spec §1.4: bilinear resize to image_size² (no antialias, align_corners=False: torchvision 0.15's tensor
    `Resize`), ImageNet normalisation, then the cast to the model dtype. Non-square inputs are squashed.

    images: (B, 3, H, W) float in [0, 1]. Resizing and normalising run in float32 (torchvision upcasts half
    inputs the same way); only the result is cast.
    """
    x = images if images.dtype in (torch.float32, torch.float64) else images.float()
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=False)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


def tags_from_logits(logits: Tensor, thresholds: Tensor, tag_names: Sequence[str]) -> list[str]:
    """Per image, the names of the tags with sigmoid(logit) > threshold (strictly), in tag-list index order,
    joined with ", " ("" when none). logits: (B, K) in any dtype; thresholds: (K,) float32.

    The sigmoid runs in the logits' dtype and the comparison in float32, as the reference's
    `torch.sigmoid(logits) > class_threshold` does under type promotion.
    """
    on = torch.sigmoid(logits).float().cpu() > thresholds.float().cpu()  # (B, K) bool
    return [", ".join(tag_names[k] for k in row.nonzero().flatten().tolist()) for row in on]


def load_tag_names() -> tuple[str, ...]:
    """The 4585 English RAM tag names shipped in `osediff/data/ram_tag_list.txt` (spec §1.4)."""
    return tuple((files("osediff") / "data" / "ram_tag_list.txt").read_text(encoding="utf-8").splitlines())


def load_thresholds() -> Tensor:
    """The 4585 per-class thresholds of `osediff/data/ram_tag_list_threshold.txt`, float32 (spec §1.4: with the
    reference's max_threthold=0.9 and add_threthold=0 these are exactly the file values)."""
    text = (files("osediff") / "data" / "ram_tag_list_threshold.txt").read_text(encoding="utf-8")
    return torch.tensor([float(s) for s in text.split()], dtype=torch.float32, device="cpu")


def lora_linear_delta(lora_a: Tensor, lora_b: Tensor, lora_alpha: float) -> Tensor:
    """loralib `Linear`: ΔW = B·A · α/r with A [r, in], B [out, r] (spec Appendix B), in float32 as loralib
    merges it (the weights are fp32 when `.eval()` merges, before the cast to the run dtype)."""
    r = lora_a.shape[0]
    return (lora_b.float() @ lora_a.float()) * (lora_alpha / r)


def lora_qv_delta(lora_a: Tensor, lora_b: Tensor, lora_alpha: float) -> Tensor:
    """loralib `MergedLinear(dim, 3·dim, enable_lora=[True, False, True])` on Swin's qkv (spec Appendix B).

    A is [2r, in] and B is [2·dim, r]: a grouped product, q gets B[:dim]·A[:r] and v gets B[dim:]·A[r:], both
    scaled by α/r; the k rows get nothing. Returns the (3·dim, in) float32 ΔW (loralib's precision).
    """
    r, dim = lora_a.shape[0] // 2, lora_b.shape[0] // 2
    a, b = lora_a.float(), lora_b.float()
    s = lora_alpha / r
    zeros = a.new_zeros(dim, a.shape[1])
    return torch.cat([(b[:dim] @ a[:r]) * s, zeros, (b[dim:] @ a[r:]) * s])


def interpolate_bias_table(table: Tensor, size: int) -> Tensor:
    """Resize a ((2w-1)², heads) relative position bias table to (size², heads), bicubic on the (2w-1)² grid.

    RAM's loader resizes with BEiT's geometric-spaced scipy cubic interpolation instead; the two agree only when
    nothing is resized, which is the case for the published Swin-L 384 checkpoint (window 12 throughout).
    """
    n, heads = table.shape
    src = round(n**0.5)
    grid = table.float().T.reshape(1, heads, src, src)
    grid = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
    return grid.reshape(heads, size * size).T.contiguous().to(table.dtype)


# ----------------------------------------------------------------------------------------------- tagging head

class _Attention(nn.Module):
    """BERT attention projections; in tagging mode queries come from the labels, keys/values from the image."""

    def __init__(self, hidden: int, context_width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(context_width, hidden)
        self.value = nn.Linear(context_width, hidden)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:  # (B, K, D), (B, L, E) -> (B, K, D)
        B, K, D = x.shape
        q = self.query(x).view(B, K, self.heads, -1).transpose(1, 2)  # (B, h, K, D/h)
        k = self.key(context).view(B, -1, self.heads, D // self.heads).transpose(1, 2)  # (B, h, L, D/h)
        v = self.value(context).view(B, -1, self.heads, D // self.heads).transpose(1, 2)
        # Written out (not SDPA) so fp16 rounds as BERT does: q·kᵀ, then / √d, softmax, · v. No mask: the
        # reference's image attention mask is all ones, i.e. an additive zero.
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D // self.heads)
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, K, D)


class _AddNorm(nn.Module):
    """BERT's output sub-block: LayerNorm(residual + dense(x)) (its dropout is inactive at inference)."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(residual + self.dense(x))


class _CrossAttention(nn.Module):
    def __init__(self, c: RAMConfig):
        super().__init__()
        self.self = _Attention(c.hidden_size, c.embed_width, c.head_heads)
        self.output = _AddNorm(c.hidden_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        return self.output(self.self(x, context), x)


class _Intermediate(nn.Module):
    def __init__(self, c: RAMConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # BERT's "gelu" is the exact (erf) GELU


class TaggingLayer(nn.Module):
    """A BERT layer in RAM's tagging mode: its self-attention is deleted, cross-attention then the FFN remain."""

    def __init__(self, c: RAMConfig):
        super().__init__()
        self.crossattention = _CrossAttention(c)
        self.intermediate = _Intermediate(c)
        self.output = _AddNorm(c.intermediate_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.crossattention(x, context)
        return self.output(self.intermediate(x), x)


class TaggingHead(nn.Module):
    """RAM's image-tag recognition decoder (Query2Label style); keys `encoder.layer.{i}....` as in BertModel."""

    def __init__(self, c: RAMConfig):
        super().__init__()
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(TaggingLayer(c) for _ in range(c.head_layers))})

    def forward(self, queries: Tensor, context: Tensor) -> Tensor:  # (B, K, D), (B, L, E) -> (B, K, D)
        for layer in self.encoder["layer"]:
            queries = layer(queries, context)
        return queries


# --------------------------------------------------------------------------------------------------- the tagger

class RAMTagger(nn.Module):
    """RAM (or DAPE, with its LoRA merged) as a prompt extractor: images in, one tag string per image out.

    Build it from the published files with `RAMTagger.from_files(ram_path, dape_path)`. The constructor makes
    a randomly initialised model of `config` (tests, benchmarks). Inference only: gradients are never needed.
    """

    def __init__(self, config: RAMConfig = RAMConfig(), tag_names: Sequence[str] | None = None,
                 thresholds: Sequence[float] | Tensor | None = None):
        super().__init__()
        c = self.config = config
        names = load_tag_names() if tag_names is None else tuple(tag_names)
        th = load_thresholds() if thresholds is None else thresholds
        th = torch.as_tensor(th, dtype=torch.float32, device="cpu").detach().clone()
        if len(names) != c.num_classes or th.shape != (c.num_classes,):
            raise ValueError(f"RAMTagger: {c.num_classes} classes but {len(names)} tag names and "
                             f"{tuple(th.shape)} thresholds")
        self.tag_names = names
        self.thresholds = th  # float32 on the CPU, never cast with the model (the reference keeps it float32)

        self.visual_encoder = SwinTransformer(c.image_size, c.patch_size, c.embed_dim, c.depths, c.num_heads,
                                              c.window_size, c.mlp_ratio)
        self.image_proj = nn.Linear(self.visual_encoder.num_features, c.embed_width)
        self.label_embed = nn.Parameter(torch.zeros(c.num_classes, c.embed_width))
        self.wordvec_proj = nn.Linear(c.embed_width, c.hidden_size)
        self.tagging_head = TaggingHead(c)
        self.fc = nn.Linear(c.hidden_size, 1)

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def forward(self, images: Tensor) -> list[str]:
        """images: (B, 3, H, W) float in [0, 1], any size, on the tagger's device.

        Returns B strings: the tags with sigmoid(logit) > their class threshold, in tag-list order, joined with
        ", " ("" when none), exactly as the reference's `generate_tag` (spec §1.4). The caller adds any suffix.
        """
        return tags_from_logits(self.logits(images), self.thresholds, self.tag_names)

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, num_classes) tag logits in the model dtype."""
        if not (isinstance(images, Tensor) and images.ndim == 4 and images.shape[1] == 3
                and images.is_floating_point()):
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"RAMTagger expects a float (B, 3, H, W) image batch in [0, 1], got {got}")
        if images.device != self.device:
            raise ValueError(f"RAMTagger is on {self.device} but the images are on {images.device}")
        x = preprocess(images, self.config.image_size, self.dtype)
        image_embeds = self.image_proj(self.visual_encoder(x))  # (B, 1 + L, E)
        labels = F.relu(self.wordvec_proj(self.label_embed))  # (K, D)
        hidden = self.tagging_head(labels.expand(x.shape[0], -1, -1), image_embeds)  # (B, K, D)
        return self.fc(hidden).squeeze(-1)

    @classmethod
    def from_files(cls, ram_path: str | Path, dape_path: str | Path | None = None, *,
                   config: RAMConfig = RAMConfig(), tag_names: Sequence[str] | None = None,
                   thresholds: Sequence[float] | Tensor | None = None, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None) -> RAMTagger:
        """Plain RAM from `ram_path` (training prompts, spec §4.4), or DAPE with `dape_path` (inference, §1.4).

        RAM file (`ram_swin_large_14m.pth`): the dict entry `model` is read as RAM's `load_checkpoint_swinlarge`
        does: `vision_multi.*` renamed to `tagging_head.*`, bias tables resized to the window if needed. Only
        the tensors tagging uses are kept; the rest (RAM's two unused BERTs, anything else in the file) is
        memory-mapped and never read, let alone copied to `device`. DAPE file (`DAPE.pth`): a plain state dict
        loaded over it with `strict=False` semantics (matching weights overwrite), and every LoRA pair found is
        merged into its layer's weight. Files are read with `torch.load(weights_only=True)` only.
        The result is on `device` (default CPU) in `dtype` (default float32), in eval mode, without gradients.
        Raises FileNotFoundError for a missing file, ValueError for a file that is not such a checkpoint.
        """
        ram_file = _existing(ram_path, "RAM", RAM_SOURCE)
        dape_file = None if dape_path is None else _existing(dape_path, "DAPE", DAPE_SOURCE)
        with torch.device("meta"):  # shapes only; the real tensors come from the files
            tagger = cls(config, tag_names, thresholds)
        wanted = {k: v.shape for k, v in tagger.state_dict().items()}

        weights, lora = _select(_read_ram(ram_file), wanted, ram_file, from_ram=True)
        missing = [k for k in wanted if k not in weights]
        if len(missing) == len(wanted):
            raise ValueError(f"{ram_file} holds none of the RAM tagger's weights (e.g. {missing[0]}); "
                             f"is it a RAM Swin-L checkpoint? To get one, {RAM_SOURCE}")
        if missing:
            raise ValueError(f"{ram_file} lacks {len(missing)} weight(s) the RAM tagger needs: "
                             f"{', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}")
        if dape_file is not None:
            extra_weights, extra_lora = _select(_read_dape(dape_file), wanted, dape_file, from_ram=False)
            if not extra_weights and not extra_lora:
                raise ValueError(f"{dape_file} holds no LoRA (`*.lora_A`/`*.lora_B`) or tagger weights of RAM; "
                                 f"is it DAPE.pth? To get it, {DAPE_SOURCE}")
            weights.update(extra_weights)
            lora.update(extra_lora)
        _merge_lora(weights, lora, config.lora_alpha)

        tagger.load_state_dict(weights, strict=True, assign=True)
        tagger.to(device=device or "cpu", dtype=dtype or torch.float32)
        return tagger.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------ loading

# Modules that carry loralib LoRA in DAPE and that tagging uses (spec Appendix B).
_LORA_TARGET = re.compile(r"(visual_encoder\.layers\.\d+\.blocks\.\d+\.attn\.qkv"
                          r"|tagging_head\.encoder\.layer\.\d+\.crossattention\.self\.(query|key))")


def _existing(path: str | Path, what: str, source: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} weights not found: {p} is not a file. To get them, {source}.")
    return p


def _torch_load(path: Path):
    # the same safe read as `osediff download --check` (weights_only, mmap where the format allows)
    from osediff.weights.check import torch_load

    return torch_load(path)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _read_ram(path: Path) -> Mapping[str, Tensor]:
    ckpt = _torch_load(path)
    if not (isinstance(ckpt, Mapping) and _is_state_dict(ckpt.get("model"))):
        hint = " It looks like a plain state dict (DAPE.pth?): pass it with `--dape`." if _is_state_dict(ckpt) else ""
        raise ValueError(f"{path} is not a RAM checkpoint: it has no `model` state dict.{hint} "
                         f"To get RAM, {RAM_SOURCE}.")
    return ckpt["model"]


def _read_dape(path: Path) -> Mapping[str, Tensor]:
    sd = _torch_load(path)
    if not _is_state_dict(sd):
        hint = " It looks like a RAM checkpoint: pass it with `--ram`." if isinstance(sd, Mapping) and "model" in sd \
            else ""
        raise ValueError(f"{path} is not a DAPE checkpoint (a plain state dict of tensors).{hint} "
                         f"To get it, {DAPE_SOURCE}.")
    return sd


def _select(raw: Mapping[str, Tensor], wanted: Mapping[str, torch.Size], path: Path,
            from_ram: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The tensors of one checkpoint that tagging uses, under this module's names, and its LoRA pairs.

    Reproduces what the reference's `load_state_dict(strict=False)` ends up putting into the tagging path:
    - RAM's loader renames `vision_multi` to `tagging_head` (the renamed entry wins over an existing one);
    - RAM ties `tag_encoder.encoder.layer.{i}` (i < head layers) to `tagging_head.encoder.layer.{i}`: the
      tagging_head entry is loaded last and wins, a tag_encoder entry counts only when the tagging_head one is
      absent, and LoRA on a tied query/key is merged into the shared weight too (loralib merges per module);
    - `relative_position_index` / `attn_mask` and everything else tagging does not use are ignored.
    """
    weights: dict[str, Tensor] = {}
    lora: dict[str, Tensor] = {}
    rank: dict[str, int] = {}  # which source an entry came from: tied copy 0 < own name 1 < renamed 2
    for key, value in raw.items():
        renamed = from_ram and "vision_multi" in key
        key = key.replace("vision_multi", "tagging_head") if renamed else key
        if key.endswith((".lora_A", ".lora_B")):
            module = _tied_name(key[:-len(".lora_A")])
            if _LORA_TARGET.fullmatch(module) and f"{module}.weight" in wanted:
                lora[key] = value  # a tied module's LoRA keeps its tag_encoder name: it adds its own ΔW
            continue
        name = _tied_name(key)
        r = 0 if name != key else 1 + renamed
        if name in wanted and r >= rank.get(name, -1):
            weights[name], rank[name] = value, r
    return {k: _fit(k, v, wanted[k], path, from_ram) for k, v in weights.items()}, lora


def _tied_name(key: str) -> str:
    """tag_encoder.encoder.layer.{i}.X -> tagging_head.encoder.layer.{i}.X for the tied sub-modules."""
    return re.sub(r"^tag_encoder\.(encoder\.layer\.\d+\.(crossattention|intermediate|output)\.)",
                  r"tagging_head.\1", key)


def _fit(key: str, value: Tensor, shape: torch.Size, path: Path, from_ram: bool) -> Tensor:
    if value.shape == shape:
        return value
    if from_ram and key.endswith("relative_position_bias_table") and value.ndim == 2 and value.shape[1] == shape[1]:
        size = round(shape[0] ** 0.5)
        logger.warning("%s: resizing %s from %s to %s (bicubic; RAM's own loader uses scipy cubic, so the "
                       "result differs slightly from the reference)", path, key, tuple(value.shape), tuple(shape))
        return interpolate_bias_table(value, size)
    raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the RAM tagger expects {tuple(shape)}; "
                     "is it a RAM Swin-L (384) checkpoint?")


def _merge_lora(weights: dict[str, Tensor], lora: Mapping[str, Tensor], lora_alpha: float) -> None:
    """Replace each LoRA-carrying weight by W + ΔW (spec Appendix B); float64 sum, one rounding to W's dtype."""
    for module in sorted({k.rsplit(".", 1)[0] for k in lora}):
        a, b = lora.get(f"{module}.lora_A"), lora.get(f"{module}.lora_B")
        if a is None or b is None:
            raise ValueError(f"LoRA of {module} has only one of lora_A / lora_B")
        target = f"{_tied_name(module)}.weight"
        w = weights[target]
        qkv = module.endswith(".qkv")
        groups = 2 if qkv else 1  # q and v for Swin's MergedLinear, one block for a Linear
        out = 3 * b.shape[0] // 2 if qkv else b.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != groups * b.shape[1] or (out, a.shape[1]) != w.shape:
            raise ValueError(f"LoRA of {module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit its "
                             f"weight {tuple(w.shape)}")
        delta = lora_qv_delta(a, b, lora_alpha) if qkv else lora_linear_delta(a, b, lora_alpha)
        weights[target] = (w.float() + delta).to(w.dtype)
