"""What OSEDiff's trained tensors are attached to: the LoRA selection rules of the reference (spec §2.2, §2.3)
as plain data and pure functions of parameter names.

One definition serves two callers: `core.lora` applies it to a live `nn.Module` (`named_parameters()`), and
`weights.check` applies it to the tensor names in a base model's safetensors header, to derive the keys and
shapes an `osediff.pkl` must hold for that base without building the model.
"""

from __future__ import annotations

from collections.abc import Iterable

LORA_ALPHA = 8  # peft's default, which the reference relies on (spec §2.2)
UNET_ADAPTERS = ("default_encoder", "default_decoder", "default_others")
VAE_ADAPTER = "default_encoder"

# Pattern order matters for the UNet (first match wins, spec §2.2); the VAE tests every pattern (§2.3).
UNET_PATTERNS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
                 "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")
VAE_PATTERNS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v",
                "to_out.0")

# Target counts of the published model on SD 2.1-base (spec §2.2, §2.3, Appendix A).
SD21_BASE_COUNTS = {"default_encoder": 94, "default_decoder": 148, "default_others": 16, "vae_raw": 65,
                    "vae_unique": 32}


def unet_targets(param_names: Iterable[str]) -> dict[str, list[str]]:
    """UNet LoRA targets split into the three reference adapters (spec §2.2), in the order of `param_names`.

    For SD 2.1-base in `named_parameters()` order: 94 / 148 / 16 modules, the order the checkpoint stores.
    """
    groups: dict[str, list[str]] = {a: [] for a in UNET_ADAPTERS}
    for name in param_names:
        if "bias" in name or "norm" in name:
            continue
        for pattern in UNET_PATTERNS:
            if pattern in name:
                module = name.replace(".weight", "")
                if "down_blocks" in name or "conv_in" in name:
                    groups["default_encoder"].append(module)
                elif "up_blocks" in name or "conv_out" in name:
                    groups["default_decoder"].append(module)
                else:
                    groups["default_others"].append(module)
                break
    return groups


def vae_targets(param_names: Iterable[str]) -> list[str]:
    """VAE-encoder LoRA targets exactly as the reference stores them: for SD 2.1-base 65 entries with
    duplicates, 32 unique modules (spec §2.3, Appendix A.1). Use `unique()` for the module set."""
    targets: list[str] = []
    for name in param_names:
        if "bias" in name or "norm" in name:
            continue
        for pattern in VAE_PATTERNS:
            if pattern in name and "encoder" in name:
                targets.append(name.replace(".weight", ""))
            elif "quant_conv" in name and "post_quant_conv" not in name:
                targets.append(name.replace(".weight", ""))
    return targets


def unique(names: Iterable[str]) -> list[str]:
    """First-occurrence order, duplicates removed."""
    return list(dict.fromkeys(names))


def lora_shapes(weight_shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """peft's (A, B) shapes for a base weight: Linear [out,in] -> A [r,in], B [out,r]; Conv [out,in,k,k] ->
    A [r,in,k,k], B [out,r,1,1] (spec §2.2)."""
    out, rest = weight_shape[0], tuple(weight_shape[1:])
    if len(weight_shape) == 2:
        return (rank, *rest), (out, rank)
    return (rank, *rest), (out, rank, 1, 1)


# The authors' osediff.pkl (spec §3.1): the target-list entries by adapter, and every top-level key.
AUTHORS_LIST_KEYS = {"default_encoder": "unet_lora_encoder_modules", "default_decoder": "unet_lora_decoder_modules",
                     "default_others": "unet_lora_others_modules"}
AUTHORS_KEYS = ("vae_lora_encoder_modules", *AUTHORS_LIST_KEYS.values(), "rank_unet", "rank_vae",
                "state_dict_unet", "state_dict_vae")
CONV_IN_KEYS = ("conv_in.base_layer.weight", "conv_in.base_layer.bias")  # fully fine-tuned, stored whole


def expected_state_keys(targets: dict[str, list[str]], vae_targets: list[str]) -> tuple[set[str], set[str]]:
    """(UNet keys, VAE keys) the reference's save filter produces for these targets (spec §3.1)."""
    unet = {f"{m}.lora_{ab}.{a}.weight" for a in UNET_ADAPTERS for m in targets[a] for ab in "AB"}
    vae = {f"{m}.lora_{ab}.{VAE_ADAPTER}.weight" for m in vae_targets for ab in "AB"}
    return unet | set(CONV_IN_KEYS), vae
