"""The training configuration (spec §4) as frozen dataclasses; `osediff train` derives its flags from them.

Defaults are the reference's command (spec §4.1) except where a documented fix applies: the run stops at
`max_steps` (14000, the released model's length; the reference never stops, §8.14) and checkpoints are written
every `checkpoint_every` steps (the reference writes at step % 500 == 1). Five sections, one per concern; the
resolved `TrainConfig` is written to `<output>/config.json` and into every checkpoint's metadata.

This module is light (no torch): the CLI imports it to build its parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from osediff.degradation.jpeg_tables import JPEG_TABLES_HELP, JpegTables

# The reference's negative prompts (spec §4.1, §4.7).
NEG_PROMPT = ("painting, oil painting, illustration, drawing, art, sketch, cartoon, CG Style, 3D render, "
              "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, "
              "jpeg artifacts, deformed, lowres, over-smooth")
FACE_NEG_PROMPT = ("blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, "
                   "deformed, lowres, over-smooth")

MixedPrecision = Literal["no", "fp16", "bf16"]
AmpPlacement = Literal["reference", "frozen-dtype"]


def _help(text: str, default=None, **kw):
    return field(default=default, metadata={"help": text}, **kw)


@dataclass(frozen=True)
class DataConfig:
    """Training images and prompts (spec §4.2, §4.4, §4.7)."""

    data: tuple[str, ...] = _help("image folders (searched recursively) and/or .txt lists of image paths", ())
    repeats: tuple[int, ...] = _help("integer repeat count per --data source (the reference's "
                                     "dataset_prob_paths_list); default 1 each", ())
    crop: int = _help("HQ crop size in pixels, a multiple of 8 (face mode: images are resized to crop×crop)", 512)
    face: bool = _help("face variant (spec §4.7): resize to crop², flips + transposition, CodeFormer degradation",
                       False)
    degradation: str | None = _help("degradation YAML (default: the shipped params_realesrgan.yml, or "
                                    "params_codeformer.yml with --face)")
    jpeg_tables: JpegTables = _help(JPEG_TABLES_HELP + " Overrides the --degradation file's jpeg_tables; not "
                                    "used with --face, whose JPEG is libjpeg's.", "reference")
    workers: int = _help("data-loader worker processes", 4)
    prompts: Literal["ram", "none", "captions"] = _help(
        "training prompts: RAM tags of the HQ crop (--ram), none (empty prompt), or a --captions file", "ram")
    ram: str | None = _help("ram_swin_large_14m.pth for --prompts ram (env OSEDIFF_RAM)")
    captions: str | None = _help("captions file for --prompts captions: JSON {image: caption} or lines "
                                 "'image<TAB>caption'; image = the listed path, its file name or its stem")
    neg_prompt: str | None = _help("negative prompt, the 'uncond' branch of the real score's CFG "
                                   "(default: the reference's, or its face variant with --face)")

    def __post_init__(self) -> None:
        if self.crop <= 0 or self.crop % 8:
            raise ValueError(f"--crop must be a positive multiple of 8, got {self.crop}")
        if self.repeats and len(self.repeats) != len(self.data):
            raise ValueError(f"--repeats gives {len(self.repeats)} counts for {len(self.data)} --data sources")
        if any(r < 1 for r in self.repeats):
            raise ValueError(f"--repeats must be positive integers, got {self.repeats}")
        if self.prompts == "captions" and not self.captions:
            raise ValueError("--prompts captions needs --captions FILE")
        if self.workers < 0:
            raise ValueError("--workers must be >= 0")
        if self.neg_prompt is None:  # resolved here, so the printed and saved config says what is used
            object.__setattr__(self, "neg_prompt", FACE_NEG_PROMPT if self.face else NEG_PROMPT)


@dataclass(frozen=True)
class ModelConfig:
    """Networks (spec §2): the LoRA generator, the frozen real score, the LoRA fake score."""

    base: str | None = _help("SD 2.1-base: diffusers folder, single .safetensors/.ckpt file, or hub id (env OSEDIFF_BASE)")
    rank: int = _help("LoRA rank of the generator (UNet and VAE encoder) and of the fake score", 4)
    fake_lora: Literal["mid", "all"] = _help(
        "fake-score LoRA: 'mid' = mid-block only, what the released model was trained with (spec §2.5, §8.15); "
        "'all' = the 258 generator targets (the evident intent; a deviation)", "mid")
    gradient_checkpointing: bool = _help("recompute activations in the backward (generator and fake UNets, VAE)",
                                         False)
    frozen_dtype: Literal["auto", "fp32", "fp16", "bf16"] = _help(
        "dtype of the frozen real-score UNet and RAM (and of the text encoder with --amp-placement frozen-dtype; "
        "with reference it keeps fp32 weights, as the authors'); auto = the mixed-precision dtype", "auto")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"--rank must be >= 1, got {self.rank}")


@dataclass(frozen=True)
class LossConfig:
    """L = λ_l2·L2 + λ_lpips·LPIPS + λ_vsd·VSD for the generator; λ_fake·ε-MSE for the fake score (spec §4.6)."""

    lambda_l2: float = _help("weight of the pixel L2 loss", 1.0)
    lambda_lpips: float = _help("weight of LPIPS-VGG (0 skips loading LPIPS)", 2.0)
    lambda_vsd: float = _help("weight of the VSD loss", 1.0)
    lambda_fake: float = _help("weight of the fake score's ε-MSE (the reference's lambda_vsd_lora)", 1.0)
    cfg_vsd: float = _help("classifier-free guidance scale of the real score, negative prompt as 'uncond'", 7.5)
    vsd_t_min: int = _help("VSD timesteps t ~ randint(vsd_t_min, vsd_t_max)", 20)
    vsd_t_max: int = _help("exclusive upper bound of the VSD timesteps", 980)
    lpips_vgg: str | None = _help("torchvision vgg16-397923af.pth (default: downloaded once to the torch hub cache)")
    lpips_lin: str | None = _help("lpips v0.1 vgg.pth heads (default: downloaded once to the torch hub cache)")

    def __post_init__(self) -> None:
        if not 0 <= self.vsd_t_min < self.vsd_t_max <= 1000:
            raise ValueError(f"need 0 <= vsd_t_min < vsd_t_max <= 1000, got {self.vsd_t_min}, {self.vsd_t_max}")


@dataclass(frozen=True)
class OptimConfig:
    """Two AdamW optimisers (generator, fake score) with the same settings and a constant LR (spec §4.6)."""

    lr: float = _help("learning rate of both optimisers (constant)", 5e-5)
    adam_beta1: float = _help("AdamW β1", 0.9)
    adam_beta2: float = _help("AdamW β2", 0.999)
    weight_decay: float = _help("AdamW weight decay", 1e-2)
    adam_eps: float = _help("AdamW ε", 1e-8)
    max_grad_norm: float = _help("gradient-norm clip of each model", 1.0)
    adam_8bit: bool = _help("bitsandbytes AdamW8bit (saves optimiser memory; needs bitsandbytes)", False)


@dataclass(frozen=True)
class RunConfig:
    """Length, batch, precision, checkpoints, logging, validation."""

    output: str = _help("run folder: config.json, checkpoints/, logs/, val/", "")
    max_steps: int = _help("optimiser steps to train (the released model: about 14k, spec §4.1)", 14000)
    batch_size: int = _help("images per process per micro-step (the reference: 4 per GPU, 4 GPUs)", 4)
    grad_accum: int = _help("micro-steps per optimiser step", 1)
    mixed_precision: MixedPrecision = _help("autocast dtype (the reference: fp16; use no or bf16 on a CPU)",
                                            "fp16")
    amp_placement: AmpPlacement = _help(
        "where mixed precision applies (spec §4.5, §4.6 'Precision'). reference = the authors' recipe: the text "
        "encoder (fp32 weights) and the posterior sample (noise drawn in the autocast dtype) run inside the "
        "generator's autocast region, the real score runs in pure --frozen-dtype outside autocast (its CFG sum in "
        "that dtype). frozen-dtype = the text encoder in --frozen-dtype outside autocast, the real score under "
        "autocast (fp32 norms, softmax and CFG), the posterior noise in fp32. Equal without mixed precision",
        "reference")
    seed: int = _help("seed of the LoRA init, data order, crops, degradations and noise", 123)
    checkpoint_every: int = _help("write a checkpoint every N steps (and at the last step)", 500)
    keep_checkpoints: int = _help("keep the last K checkpoints", 3)
    log_every: int = _help("write losses to the tracker every N steps", 10)
    val_dir: str | None = _help("folder of LR images super-resolved for validation")
    val_every: int = _help("validate every N steps", 500)
    val_images: int = _help("validate on the first N images of --val-dir", 4)
    val_scale: int = _help("upscaling factor of the validation", 4)
    tracker: Literal["tensorboard", "wandb", "none"] = _help("experiment tracker", "tensorboard")
    resume: str | None = _help("resume from a checkpoint folder, or 'latest' in <output>/checkpoints")
    tf32: bool = _help("allow TF32 matmuls on CUDA (the reference enables them on import, spec §1.11)", True)

    def __post_init__(self) -> None:
        if not self.output:
            raise ValueError("an output folder is required (-o/--output)")
        for name in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every",
                     "val_every", "val_scale"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig
    model: ModelConfig
    loss: LossConfig
    optim: OptimConfig
    run: RunConfig

    def __post_init__(self) -> None:
        if not self.data.data:
            raise ValueError("no training data: pass --data FOLDER_OR_LIST [...]")


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "optim": OptimConfig,
                             "run": RunConfig}
