"""SD 2.1-base as the package knows it without any download: the diffusers configs of its four networks and its
CLIP tokenizer, so a single-file checkpoint (A1111/ComfyUI) can be built offline and no library ever reaches
for a config on the hub (diffusers would infer `stabilityai/stable-diffusion-2-1`, the 768 v-prediction repo).

The configs are written from the architecture (spec §2.1): UNet 4→4 channels, blocks 320/640/1280/1280 with
2 layers, heads of 64 channels (attention_head_dim 5/10/20/20 in diffusers' naming), linear projections,
cross-attention width 1024, 64 latent px (512 image px); VAE 128/256/512/512, 4 latent channels, scaling 0.18215;
the OpenCLIP ViT-H/14 text tower of which diffusers keeps 23 of 24 blocks (width 1024, 16 heads, MLP 4096).

The tokenizer is CLIP's byte-level BPE (49,408 tokens), derived from the merges list the package carries in
`osediff/data/clip_bpe_simple_vocab_16e6.txt.gz` (MIT, OpenAI CLIP; see `clip_bpe.LICENSE.txt` there).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                              "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
            norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, upcast_attention=False)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
           block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
           act_fn="silu")
# bos/eos/pad ids as in the diffusers SD 2.x text_encoder config (eos 2 selects transformers' legacy pooling;
# OSEDiff uses only the last hidden states, so it does not matter here)
TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=512, layer_norm_eps=1e-5,
            bos_token_id=0, eos_token_id=2, pad_token_id=1)
SCHEDULER = {"_class_name": "DDPMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "skip_prk_steps": True}
TEXT_BLOCKS_IN_FILE = 24  # OpenCLIP ViT-H/14's text tower; SD 2 reads the penultimate block's output

BPE_FILE = Path(__file__).resolve().parents[1] / "data" / "clip_bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def byte_alphabet() -> list[str]:
    """CLIP's byte-level alphabet in token-id order: the 188 printable bytes map to themselves, the other 68 to
    the code points from 256 on (so no token contains whitespace or control characters)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def bpe_merges() -> list[str]:
    """The 48,894 merges CLIP uses ("a b" per line, first line of the file is a version header)."""
    with gzip.open(BPE_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    n = VOCAB_SIZE - 2 * 256 - len(SPECIALS)
    return lines[1:1 + n]


def clip_vocab(merges: list[str]) -> dict[str, int]:
    """token -> id: the alphabet, the alphabet as word ends, one token per merge, then the two specials."""
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in merges] + list(SPECIALS)
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer(folder: str | os.PathLike) -> Path:
    """vocab.json, merges.txt and the tokenizer config of SD 2.x (pad "!", 77 tokens) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = bpe_merges()
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(merges), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "!", "bos_token": SPECIALS[0],
         "eos_token": SPECIALS[1], "unk_token": SPECIALS[1], "do_lower_case": True}))
    return folder


def load_tokenizer():
    """SD 2.x's CLIPTokenizer, built from the carried merges in a temporary folder (no hub access)."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="osediff-tokenizer-") as d:
        write_tokenizer(d)
        return CLIPTokenizer.from_pretrained(d)


def write_configs(folder: str | os.PathLike) -> Path:
    """The configs of a diffusers SD 2.1-base folder (no weights): what `convert` writes next to the weights."""
    folder = Path(folder)
    for sub, cfg in (("unet", {"_class_name": "UNet2DConditionModel", **UNET}),
                     ("vae", {"_class_name": "AutoencoderKL", **VAE}),
                     ("text_encoder", {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **TEXT})):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "config.json").write_text(json.dumps(cfg, indent=1))
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=1))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    write_tokenizer(folder / "tokenizer")
    return folder
