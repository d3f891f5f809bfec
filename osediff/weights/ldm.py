"""The original Stable Diffusion ("LDM") single-file layout, read as the three diffusers networks.

A1111 and ComfyUI keep SD 2.1-base as one `.safetensors` or `.ckpt` whose tensor names follow the
latent-diffusion code: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
`cond_stage_model.model.*` (OpenCLIP's text tower). This module maps each of those names to the diffusers
parameter it becomes, from the architecture alone (block and layer counts in the configs of `weights.sd21`):

UNet   input_blocks.0.0 = conv_in; input_blocks.{1+b(L+1)+l}.0/.1 = down_blocks.b.resnets.l / attentions.l and
       input_blocks.{1+b(L+1)+L}.0.op = down_blocks.b.downsamplers.0.conv (L = layers per block);
       middle_block.0/1/2 = mid_block.resnets.0 / attentions.0 / resnets.1;
       output_blocks.{u(L+1)+l} = up_blocks.u layer l (L+1 layers): .0 resnet, .1 attention (or the
       upsampler's `conv` when the block has none), .2 upsampler; time_embed.0/2 = time_embedding.linear_1/2;
       out.0/2 = conv_norm_out/conv_out. Resnets: in_layers.0/2 = norm1/conv1, emb_layers.1 = time_emb_proj,
       out_layers.0/3 = norm2/conv2, skip_connection = conv_shortcut. Transformer blocks keep their names.
VAE    encoder.down.b / decoder.up.b (numbered from the bottom, so up block b is diffusers' up_blocks[n-1-b]):
       block.l = resnets.l, downsample/upsample.conv = down/upsamplers.0.conv, nin_shortcut = conv_shortcut,
       mid.block_1/2 = mid_block.resnets.0/1, mid.attn_1.{norm,q,k,v,proj_out} = mid_block.attentions.0.
       {group_norm,to_q,to_k,to_v,to_out.0} (1×1 convolutions there, linear layers here), norm_out =
       conv_norm_out.
Text   transformer.resblocks.i (i < 23; the 24th is unused, SD 2 reads the penultimate block) =
       encoder.layers.i with attn.in_proj_{weight,bias} split in three (q, k, v), ln_1/ln_2 =
       layer_norm1/2, mlp.c_fc/c_proj = mlp.fc1/fc2; token_embedding, positional_embedding and ln_final are the
       embeddings and final_layer_norm; text_projection and logit_scale are unused. Text names are given
       without transformers 4's `text_model.` prefix (transformers 5 dropped it; `text_name` adds it back).

Anything else in the file (EMA copies `model_ema.*`, the diffusion schedule buffers) is ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."
COMPONENTS = ("unet", "vae", "text_encoder")

_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
           ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))
_VAE_RESNET = (("nin_shortcut.", "conv_shortcut."),)
_VAE_ATTN = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}
_TEXT_LAYER = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
               ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj."))
_TEXT_UNUSED = ("text_projection", "logit_scale")

# (component, diffusers name, transform of the tensor: None = as is)
Target = tuple[str, str, Callable | None]


def _swap(rest: str, table) -> str | None:
    for old, new in table:
        if rest.startswith(old):
            return new + rest[len(old):]
    return None


def unet_name(key: str, layers_per_block: int) -> str | None:
    """The diffusers UNet name of an LDM UNet key (without `model.diffusion_model.`), or None if unknown."""
    fixed = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}
    for old, new in fixed.items():
        if key.startswith(old):
            return new + key[len(old):]
    m = re.match(r"(input_blocks|output_blocks|middle_block)\.(\d+)\.(?:(\d+)\.)?(.*)", key)
    if not m:
        return None
    part, i, j, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if part == "middle_block":
        if j is not None:
            return None
        if i == 1:
            return f"mid_block.attentions.0.{rest}"
        inner = _swap(rest, _RESNET)
        return f"mid_block.resnets.{i // 2}.{inner}" if i in (0, 2) and inner else None
    if j is None:
        return None
    j = int(j)
    if part == "input_blocks":
        b, layer = divmod(i - 1, layers_per_block + 1)
        if layer == layers_per_block:  # the block's downsampler
            return f"down_blocks.{b}.downsamplers.0.conv.{rest[3:]}" if j == 0 and rest.startswith("op.") else None
        if j == 0:
            inner = _swap(rest, _RESNET)
            return f"down_blocks.{b}.resnets.{layer}.{inner}" if inner else None
        return f"down_blocks.{b}.attentions.{layer}.{rest}" if j == 1 else None
    u, layer = divmod(i, layers_per_block + 1)
    if j == 0:
        inner = _swap(rest, _RESNET)
        return f"up_blocks.{u}.resnets.{layer}.{inner}" if inner else None
    if rest.startswith("conv.") and (j == 2 or j == 1):  # attention blocks never hold a bare `conv`
        return f"up_blocks.{u}.upsamplers.0.{rest}"
    return f"up_blocks.{u}.attentions.{layer}.{rest}" if j == 1 else None


def vae_name(key: str, n_blocks: int) -> str | None:
    """The diffusers VAE name of an LDM VAE key (without `first_stage_model.`), or None if unknown."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    m = re.match(r"(encoder|decoder)\.(.*)", key)
    if not m:
        return None
    side, rest = m.groups()
    if rest.startswith(("conv_in.", "conv_out.")):
        return key
    if rest.startswith("norm_out."):
        return f"{side}.conv_norm_out.{rest[len('norm_out.'):]}"
    m = re.match(r"mid\.block_([12])\.(.*)", rest)
    if m:
        return f"{side}.mid_block.resnets.{int(m.group(1)) - 1}.{_swap(m.group(2), _VAE_RESNET) or m.group(2)}"
    m = re.match(r"mid\.attn_1\.(\w+\.)(.*)", rest)
    if m:
        new = _VAE_ATTN.get(m.group(1))
        return f"{side}.mid_block.attentions.0.{new}{m.group(2)}" if new else None
    m = re.match(r"(down|up)\.(\d+)\.(.*)", rest)
    if not m or (m.group(1) == "down") != (side == "encoder"):
        return None
    b, inner = int(m.group(2)), m.group(3)
    block = f"{side}.{'down' if side == 'encoder' else 'up'}_blocks.{b if side == 'encoder' else n_blocks - 1 - b}"
    m = re.match(r"block\.(\d+)\.(.*)", inner)
    if m:
        return f"{block}.resnets.{m.group(1)}.{_swap(m.group(2), _VAE_RESNET) or m.group(2)}"
    for old in ("downsample.conv.", "upsample.conv."):
        if inner.startswith(old):
            return f"{block}.{old[:-len('.conv.')]}rs.0.conv.{inner[len(old):]}"  # downsamplers / upsamplers
    return None


def text_targets(key: str, n_layers: int) -> list[tuple[str, Callable | None]] | None:
    """[(diffusers text-encoder name, transform)] for an OpenCLIP text key (without `cond_stage_model.model.`);
    [] for a tensor that is not used; None if unknown."""
    if key == "token_embedding.weight":
        return [("embeddings.token_embedding.weight", None)]
    if key == "positional_embedding":
        return [("embeddings.position_embedding.weight", None)]
    if key.startswith("ln_final."):
        return [(f"final_layer_norm.{key[len('ln_final.'):]}", None)]
    if key in _TEXT_UNUSED:
        return []
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", key)
    if not m:
        return None
    i, rest = int(m.group(1)), m.group(2)
    if i >= n_layers:
        return []  # the blocks after the penultimate one (SD 2 reads the penultimate block's output)
    layer = f"encoder.layers.{i}"
    m = re.match(r"attn\.in_proj_(weight|bias)$", rest)
    if m:  # q, k, v stacked along the first axis: [3·D, D] / [3·D]
        return [(f"{layer}.self_attn.{p}_proj.{m.group(1)}", _chunk(n)) for n, p in enumerate("qkv")]
    inner = _swap(rest, _TEXT_LAYER)
    return [(f"{layer}.{inner}", None)] if inner else None


def text_name(name: str, model_names) -> str:
    """`name` as the installed transformers spells it: with the `text_model.` prefix if the model has one."""
    return f"text_model.{name}" if name not in model_names and f"text_model.{name}" in model_names else name


def _chunk(n: int) -> Callable:
    return lambda t: t.chunk(3, dim=0)[n]


def _to_linear(t):
    """A 1×1 convolution's weight [out, in, 1, 1] as a linear layer's [out, in] (VAE attention)."""
    return t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t


def targets(key: str, configs: dict[str, dict]) -> list[Target] | None:
    """Where one LDM tensor goes: [] for tensors not used (EMA copies, schedule buffers, text projection),
    None for a name inside the UNet/VAE/text prefixes that this architecture does not have."""
    if key.startswith(UNET_PREFIX):
        name = unet_name(key[len(UNET_PREFIX):], configs["unet"]["layers_per_block"])
        return None if name is None else [("unet", name, None)]
    if key.startswith(VAE_PREFIX):
        name = vae_name(key[len(VAE_PREFIX):], len(configs["vae"]["block_out_channels"]))
        if name is None:
            return [] if key.startswith(VAE_PREFIX + "loss.") else None  # training-only LPIPS/discriminator
        return [("vae", name, _to_linear if ".mid_block.attentions.0.to_" in name else None)]
    if key.startswith(TEXT_PREFIX):
        got = text_targets(key[len(TEXT_PREFIX):], configs["text_encoder"]["num_hidden_layers"])
        return None if got is None else [("text_encoder", n, f) for n, f in got]
    return []


def _shape_after(shape: tuple[int, ...], transform) -> tuple[int, ...]:
    if transform is None:
        return tuple(shape)
    if transform is _to_linear:
        return tuple(shape[:2]) if len(shape) == 4 else tuple(shape)
    return (shape[0] // 3, *shape[1:])


def converted_shapes(ldm: dict[str, tuple[int, ...]], configs: dict[str, dict]
                     ) -> tuple[dict[str, dict[str, tuple[int, ...]]], list[str]]:
    """({component: {diffusers name: shape}}, LDM names this architecture does not have) from LDM shapes."""
    out: dict[str, dict[str, tuple[int, ...]]] = {c: {} for c in COMPONENTS}
    unknown = []
    for key, shape in ldm.items():
        got = targets(key, configs)
        if got is None:
            unknown.append(key)
            continue
        for comp, name, transform in got:
            out[comp][name] = _shape_after(shape, transform)
    return out, unknown


# ------------------------------------------------------------------------------------------------- reading

def is_safetensors(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def ckpt_state(path: str | os.PathLike) -> dict:
    """The state dict of a `.ckpt` (its "state_dict" entry when nested), read with weights_only=True and
    memory-mapped (tensors are paged in when used, not read up front)."""
    from osediff.weights.check import BrokenWeightsError, torch_load

    obj = torch_load(Path(path))
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise BrokenWeightsError(f"{Path(path).name} holds a {type(obj).__name__}, not a state dict")
    import torch

    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def ldm_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{LDM name: shape} of a single file, from the safetensors header or the checkpoint's pickle."""
    from osediff.weights.check import safetensors_header

    if is_safetensors(path):
        return safetensors_header(Path(path))
    return {k: tuple(v.shape) for k, v in ckpt_state(path).items()}


def convert(items, configs: dict[str, dict]) -> Iterator[tuple[str, str, object]]:
    """(LDM name, tensor) pairs -> (component, diffusers name, tensor) for every used tensor, in the same order.

    Lazy, one tensor at a time: with a reader that reuses one scratch buffer (`osediff.files.tensors`), each
    yielded tensor is valid until the next one, and the caller casts or copies it at once."""
    for key, t in items:
        for comp, name, transform in targets(key, configs) or []:
            yield comp, name, t if transform is None else transform(t)
