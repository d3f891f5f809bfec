"""Tiny random stand-ins for the real weights, built locally (no network): for tests, demos and benchmarks.

- `make_tiny_sd(folder)`: an SD-2.1-base-shaped diffusers folder (unet, vae, text_encoder, tokenizer, scheduler)
  with tiny widths; `full=True` writes the full-size SD 2.1-base architecture (random weights, ~3.5 GB fp32)
  for speed and memory measurements, since weights do not change speed.
- `make_authors_checkpoint(...)`: an `osediff.pkl` in the authors' exact format (spec §3.1), produced the way
  their `save_model` produces it (peft adapters, then a key filter), with non-zero LoRA so tests can fail.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# SD 2.1-base (spec §2.1); the tiny variant keeps the block types and only shrinks widths and depth.
SD21_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                 norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0)
TINY_UNET = dict(SD21_UNET, layers_per_block=1, block_out_channels=(32, 64), down_block_types=(
    "CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 attention_head_dim=(2, 4), cross_attention_dim=32, norm_num_groups=8, sample_size=16)
SD21_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512)
TINY_VAE = dict(SD21_VAE, layers_per_block=1, block_out_channels=(8, 16, 16, 16), norm_num_groups=4,
                sample_size=64)
SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
TINY_TEXT = dict(SD21_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
SCHEDULER = {"_class_name": "DDPMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "skip_prk_steps": True}


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's byte-level BPE alphabet: printable bytes map to themselves, the rest to code points from 256 on.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_tokenizer(folder: str | os.PathLike) -> int:
    """A character-level CLIP tokenizer (no merges) with model_max_length 77; returns its vocabulary size."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=77)
    tok.save_pretrained(str(folder))
    return len(vocab)


def make_tiny_sd(folder: str | os.PathLike, seed: int = 0, full: bool = False) -> Path:
    """Write a random SD-2.1-base-like diffusers folder and return its path."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    vocab_size = write_tiny_tokenizer(folder / "tokenizer")
    if full:
        vocab_size = 49408
    ids = {} if full else {"bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": 0}
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, **(SD21_TEXT if full else TINY_TEXT), **ids))
    text.save_pretrained(folder / "text_encoder")
    UNet2DConditionModel(**(SD21_UNET if full else TINY_UNET)).save_pretrained(folder / "unet")
    vae = AutoencoderKL(**(SD21_VAE if full else TINY_VAE))
    vae.save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def make_authors_checkpoint(sd_folder: str | os.PathLike, path: str | os.PathLike, rank: int = 4,
                            seed: int = 0, lora_std: float = 0.05) -> Path:
    """Write an `osediff.pkl` in the authors' format for the base model in `sd_folder` (spec §3.1)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from osediff.core import lora
    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(sd_folder, subfolder="vae")
    unet_targets = lora.unet_lora_targets(unet)
    vae_targets = lora.vae_lora_targets(vae)
    torch.manual_seed(seed)
    lora.add_unet_adapters(unet, unet_targets, rank)
    lora.add_vae_adapter(vae, vae_targets, rank)
    with torch.no_grad():
        # B starts at zero in training; make it non-zero so the LoRA changes the output, and fine-tune conv_in.
        for name, p in [*unet.named_parameters(), *vae.named_parameters()]:
            if "lora_B" in name:
                p.normal_(0, lora_std)
        unet.conv_in.base_layer.weight.add_(torch.randn_like(unet.conv_in.base_layer.weight) * lora_std)
    sd = {"vae_lora_encoder_modules": vae_targets,
          "unet_lora_encoder_modules": unet_targets["default_encoder"],
          "unet_lora_decoder_modules": unet_targets["default_decoder"],
          "unet_lora_others_modules": unet_targets["default_others"],
          "rank_unet": rank, "rank_vae": rank,
          "state_dict_unet": lora.lora_state(unet, ("lora", "conv_in")),
          "state_dict_vae": lora.lora_state(vae, ("lora",))}
    path = Path(path)
    torch.save(sd, path)
    return path


# ------------------------------------------------------------------- single files in the original LDM layout

def _resnet_to_ldm(rest: str, vae: bool) -> str:
    # diffusers resnet names -> the latent-diffusion ones (UNet: in_layers/emb_layers/out_layers; VAE: same names)
    table = {"conv_shortcut.": "nin_shortcut."} if vae else {
        "norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
        "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}
    for new, old in table.items():
        if rest.startswith(new):
            return old + rest[len(new):]
    return rest


def ldm_unet_key(name: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """A diffusers UNet parameter name -> its name in an LDM checkpoint (written independently of
    `osediff.weights.ldm`, which maps the other way, so a test of one against the other can fail)."""
    per = layers_per_block + 1
    parts = name.split(".")
    simple = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}
    for new, old in simple.items():
        if name.startswith(new + "."):
            return "model.diffusion_model." + old + name[len(new):]
    kind, block = parts[0], parts[1] if parts[0] != "mid_block" else None
    if kind == "mid_block":
        sub, idx, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        at = 1 if sub == "attentions" else 2 * idx
        return f"model.diffusion_model.middle_block.{at}." + (rest if sub == "attentions" else _resnet_to_ldm(rest, False))
    b = int(block)
    sub, idx, rest = parts[2], int(parts[3]), ".".join(parts[4:])
    if kind == "down_blocks":
        if sub == "downsamplers":
            return f"model.diffusion_model.input_blocks.{1 + b * per + layers_per_block}.0.op.{rest[len('conv.'):]}"
        where = f"input_blocks.{1 + b * per + idx}"
    else:
        if sub == "upsamplers":
            return (f"model.diffusion_model.output_blocks.{b * per + layers_per_block}."
                    f"{2 if up_has_attention[b] else 1}.{rest}")
        where = f"output_blocks.{b * per + idx}"
    if sub == "resnets":
        return f"model.diffusion_model.{where}.0.{_resnet_to_ldm(rest, False)}"
    return f"model.diffusion_model.{where}.1.{rest}"


def ldm_vae_key(name: str, n_blocks: int) -> str:
    """A diffusers VAE parameter name -> its LDM name (see `ldm_unet_key`)."""
    parts = name.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return "first_stage_model." + name
    side, what = parts[0], parts[1]
    if what == "conv_norm_out":
        return f"first_stage_model.{side}.norm_out." + ".".join(parts[2:])
    if what in ("conv_in", "conv_out"):
        return "first_stage_model." + name
    if what == "mid_block":
        if parts[2] == "attentions":
            attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[parts[4]]
            tail = parts[6:] if parts[4] == "to_out" else parts[5:]
            return f"first_stage_model.{side}.mid.attn_1.{attn}." + ".".join(tail)
        return (f"first_stage_model.{side}.mid.block_{int(parts[3]) + 1}."
                + _resnet_to_ldm(".".join(parts[4:]), True))
    b = int(parts[2]) if side == "encoder" else n_blocks - 1 - int(parts[2])
    stage = f"first_stage_model.{side}.{'down' if side == 'encoder' else 'up'}.{b}"
    if parts[3] == "resnets":
        return f"{stage}.block.{parts[4]}." + _resnet_to_ldm(".".join(parts[5:]), True)
    return f"{stage}.{'downsample' if side == 'encoder' else 'upsample'}.conv." + ".".join(parts[6:])


def to_ldm_state(unet, vae, text_encoder, *, extra_text_block: bool = True, seed: int = 0) -> dict:
    """The three diffusers networks as one state dict in the original SD 2.x single-file layout: VAE attention
    as 1×1 convolutions, the text tower's q/k/v stacked as `in_proj`, plus what the published files carry and
    OSEDiff does not use (a 24th text block, text_projection, logit_scale, the schedule buffers)."""
    lpb = unet.config.layers_per_block
    up_attn = [t.startswith("CrossAttn") for t in unet.config.up_block_types]
    out = {ldm_unet_key(k, lpb, up_attn): v for k, v in unet.state_dict().items()}
    n_vae = len(vae.config.block_out_channels)
    for k, v in vae.state_dict().items():
        key = ldm_vae_key(k, n_vae)
        out[key] = v[:, :, None, None] if ".mid.attn_1." in key and key.endswith("weight") and v.ndim == 2 else v
    # transformers 4 names the text tower `text_model.*`, transformers 5 without the prefix
    text = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()
            if not k.endswith("position_ids")}
    t = "cond_stage_model.model."
    out[t + "token_embedding.weight"] = text["embeddings.token_embedding.weight"]
    out[t + "positional_embedding"] = text["embeddings.position_embedding.weight"]
    out[t + "ln_final.weight"] = text["final_layer_norm.weight"]
    out[t + "ln_final.bias"] = text["final_layer_norm.bias"]
    n = text_encoder.config.num_hidden_layers
    g = torch.Generator().manual_seed(seed)
    for i in range(n + (1 if extra_text_block else 0)):
        src = f"encoder.layers.{min(i, n - 1)}."
        dst = f"{t}transformer.resblocks.{i}."
        for w in ("weight", "bias"):
            out[dst + f"attn.in_proj_{w}"] = torch.cat([text[src + f"self_attn.{p}_proj.{w}"] for p in "qkv"])
            for new, old in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                             ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                v = text[src + f"{old}.{w}"]
                # the unused last block gets its own values, so using it by mistake changes the output
                out[dst + f"{new}.{w}"] = v if i < n else torch.randn(v.shape, generator=g, dtype=v.dtype)
    width = text_encoder.config.hidden_size
    out[t + "text_projection"] = torch.randn(width, width, generator=g)
    out[t + "logit_scale"] = torch.tensor(4.6052)
    out["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000)
    return out


def write_ldm_checkpoint(sd_folder: str | os.PathLike, path: str | os.PathLike, *,
                         dtype: torch.dtype = torch.float32, ema: bool = False,
                         metadata: dict[str, str] | None = None) -> Path:
    """Write the diffusers folder `sd_folder` as one A1111/ComfyUI-style file (`.safetensors` or `.ckpt`).

    `ema=True` adds `model_ema.*` copies of the UNet (with other values, as a training checkpoint has: a loader
    must ignore them). `metadata` goes into the safetensors header (e.g. ComfyUI's `modelspec.*`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    sd_folder, path = Path(sd_folder), Path(path)
    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(sd_folder, subfolder="vae")
    text = CLIPTextModel.from_pretrained(sd_folder, subfolder="text_encoder")
    state = to_ldm_state(unet, vae, text)
    del unet, vae, text
    if ema:
        g = torch.Generator().manual_seed(1)
        for k in [k for k in state if k.startswith("model.diffusion_model.")]:
            flat = "model_ema." + k[len("model.diffusion_model."):].replace(".", "")
            state[flat] = torch.randn(state[k].shape, generator=g) if state[k].is_floating_point() else state[k]
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata=metadata)
    else:
        torch.save({"state_dict": state, "global_step": 0}, path)
    return path
