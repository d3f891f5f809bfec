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
