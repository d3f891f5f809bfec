"""Tiled VAE == untiled VAE (spec §1.6.1, §8.9), on a tiny random `AutoencoderKL` with SD's layout.

fp64 runs show the tiling is exact (differences ~1e-14); fp32 runs check the ≤ 1e-4 contract against
`vae.encode` / `vae.decode`. Sensitivity tests show a halo one step short of the derived one breaks it.
"""

import copy

import pytest
import torch
from diffusers import AutoencoderKL

from osediff.tiling import vae as tv
from osediff.tiling.lockstep import spans
from osediff.tiling.vae import decode_latents, decoder_halo, encode_moments, encoder_halo

BLOCKS = 4  # SD layout: 3 downsamples, latents are /8


def tiny_vae(seed: int = 0, layers_per_block: int = 1) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * BLOCKS,
        up_block_types=("UpDecoderBlock2D",) * BLOCKS,
        block_out_channels=(4, 8, 8, 8),
        layers_per_block=layers_per_block,
        norm_num_groups=2,
        latent_channels=4,
    ).eval()
    with torch.no_grad():
        # Random GroupNorm affines (default is 1/0), and peaked attention so that local attention would
        # differ from global attention.
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
        for attn in (vae.encoder.mid_block.attentions[0], vae.decoder.mid_block.attentions[0]):
            attn.to_q.weight.mul_(4.0)
            attn.to_k.weight.mul_(4.0)
    return vae


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return tiny_vae()


@pytest.fixture(scope="module")
def vae64(vae) -> AutoencoderKL:
    return copy.deepcopy(vae).double()


def untiled_moments(vae, x):
    return vae.encode(x).latent_dist.parameters


def untiled_image(vae, z):
    return vae.decode(z).sample


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


def test_halo_of_sd21_layout():
    with torch.device("meta"):
        sd = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
        )
    # Encoder: 14 latent px of reach (x8); decoder: 138 image px of reach, ceil(138 / 8).
    assert encoder_halo(sd.encoder) == 112
    assert decoder_halo(sd.decoder) == 18


def test_halo_of_tiny_vae(vae):
    assert encoder_halo(vae.encoder) == 80
    assert decoder_halo(vae.decoder) == 14


@pytest.mark.parametrize(
    "shape, tile, tile_batch",
    [((1, 3, 176, 176), 64, 1), ((2, 3, 176, 112), 48, 3)],
)
@torch.no_grad()
def test_tiled_encode_is_exact_fp64(vae64, shape, tile, tile_batch):
    torch.manual_seed(1)
    x = torch.rand(shape, dtype=torch.float64) * 2 - 1
    out = tv._encode_tiled(
        vae64, x, tile=tile, tile_batch=tile_batch, offload="cpu" if tile_batch > 1 else None
    )
    assert out.shape == (shape[0], 8, shape[2] // 8, shape[3] // 8) and out.dtype == torch.float64
    assert maxdiff(out, untiled_moments(vae64, x)) < 1e-10


@pytest.mark.parametrize(
    "hw, tile, tile_batch",
    [((13, 29), 8, 1), ((4, 80), 16, 1), ((24, 40), 8, 4), ((1, 1), 1, 1), ((1, 37), 10, 2)],
)
@torch.no_grad()
def test_tiled_decode_is_exact_fp64(vae64, hw, tile, tile_batch):
    torch.manual_seed(2)
    z = torch.randn(2, 4, *hw, dtype=torch.float64)
    out = tv._decode_tiled(
        vae64, z, tile=tile, tile_batch=tile_batch, offload="cpu" if tile_batch > 1 else None
    )
    assert out.shape == (2, 3, 8 * hw[0], 8 * hw[1]) and out.dtype == torch.float64
    assert maxdiff(out, untiled_image(vae64, z)) < 1e-10


@torch.no_grad()
def test_encode_moments_fp32_matches_diffusers(vae):
    torch.manual_seed(3)
    x = torch.rand(2, 3, 200, 136) * 2 - 1
    ref = untiled_moments(vae, x)
    out = encode_moments(vae, x, tile=64)  # 256 > 64 + 2·32: tiled
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert maxdiff(out, ref) < 1e-4
    assert maxdiff(encode_moments(vae, x, tile=64, tile_batch=4, offload="cpu"), ref) < 1e-4
    assert maxdiff(encode_moments(vae, x), ref) < 1e-4  # untiled path


@torch.no_grad()
def test_decode_latents_fp32_matches_diffusers(vae):
    torch.manual_seed(4)
    for hw, tile in [((13, 29), 6), ((4, 80), 16), ((1, 1), 224)]:
        z = torch.randn(1, 4, *hw)
        ref = untiled_image(vae, z)
        out = decode_latents(vae, z, tile=tile)
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert maxdiff(out, ref) < 1e-4, hw
    z = torch.randn(2, 4, 13, 29)
    ref = untiled_image(vae, z)
    assert maxdiff(decode_latents(vae, z, tile=6, tile_batch=3, offload="cpu"), ref) < 1e-4


@torch.no_grad()
def test_halo_one_step_short_breaks_exactness(vae64):
    """The tests above can fail: the derived halos are the smallest exact ones."""
    torch.manual_seed(5)
    x = torch.rand(1, 3, 176, 176, dtype=torch.float64) * 2 - 1
    ref = untiled_moments(vae64, x)
    for halo in (0, encoder_halo(vae64.encoder) - 8):  # the encoder halo moves in steps of 8 px
        assert maxdiff(tv._encode_tiled(vae64, x, tile=64, halo=halo), ref) > 1e-6
    z = torch.randn(1, 4, 13, 40, dtype=torch.float64)
    ref = untiled_image(vae64, z)
    for halo in (0, decoder_halo(vae64.decoder) - 1):
        assert maxdiff(tv._decode_tiled(vae64, z, tile=6, halo=halo), ref) > 1e-6


@torch.no_grad()
def test_runtime_check_catches_a_wrong_halo(vae, monkeypatch):
    """The geometry tracker checks the derived halo independently of `decoder_halo`."""
    monkeypatch.setattr(tv, "decoder_halo", lambda decoder: 13)
    with pytest.raises(RuntimeError, match="halo"):
        tv._decode_tiled(vae, torch.randn(1, 4, 13, 40), tile=6)


@torch.no_grad()
def test_lora_wrapped_encoder_matches_untiled():
    from peft import LoraConfig

    vae = tiny_vae(seed=6, layers_per_block=2)
    targets = [
        "encoder.conv_in",
        "encoder.down_blocks.0.resnets.0.conv1",
        "encoder.down_blocks.1.resnets.1.conv2",
        "encoder.down_blocks.2.downsamplers.0.conv",
        "encoder.mid_block.attentions.0.to_k",
        "encoder.conv_out",
        "quant_conv",
    ]
    vae.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=targets))
    for name, p in vae.named_parameters():
        if "lora_B" in name:
            p.normal_(0.0, 0.2)  # B starts at zero: make the LoRA branch matter
    assert type(vae.encoder.conv_in).__module__.startswith("peft")
    torch.manual_seed(7)
    x = torch.rand(1, 3, 200, 176) * 2 - 1
    ref = untiled_moments(vae, x)
    assert maxdiff(encode_moments(vae, x, tile=56), ref) < 1e-4


@torch.no_grad()
def test_bf16_tiled_is_as_close_as_untiled(vae):
    torch.manual_seed(8)
    z = torch.randn(1, 4, 4, 40)
    ref = untiled_image(vae, z)
    vae16 = copy.deepcopy(vae).to(torch.bfloat16)
    tiled = decode_latents(vae16, z.bfloat16(), tile=10)
    assert tiled.dtype == torch.bfloat16
    err_tiled = maxdiff(tiled.float(), ref)
    err_untiled = maxdiff(untiled_image(vae16, z.bfloat16()).float(), ref)
    assert err_tiled < 2 * err_untiled + 1e-2, (err_tiled, err_untiled)


def test_tiles_only_above_the_reference_thresholds(vae, monkeypatch):
    calls = []
    monkeypatch.setattr(tv, "_encode_tiled", lambda *a, **k: calls.append("enc"))
    monkeypatch.setattr(tv, "_decode_tiled", lambda *a, **k: calls.append("dec"))
    with torch.no_grad():
        encode_moments(vae, torch.zeros(1, 3, 128, 8), tile=64)  # 128 <= 64 + 2·32
        decode_latents(vae, torch.zeros(1, 4, 1, 26), tile=4)  # 26 <= 4 + 2·11
        assert calls == []
        encode_moments(vae, torch.zeros(1, 3, 8, 136), tile=64)
        decode_latents(vae, torch.zeros(1, 4, 27, 1), tile=4)
    assert calls == ["enc", "dec"]


def test_rejects_bad_arguments(vae):
    with pytest.raises(ValueError, match="multiples of 8"):
        encode_moments(vae, torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match="tile_batch"):
        decode_latents(vae, torch.zeros(1, 4, 30, 30), tile=4, tile_batch=0)


@pytest.mark.parametrize("n, tile, align", [(1, 1, 1), (29, 4, 1), (2056, 1024, 8), (136, 64, 8), (8, 64, 8)])
def test_spans_partition_the_axis(n, tile, align):
    cores = spans(n, tile, align)
    assert cores[0][0] == 0 and cores[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(cores, cores[1:]))
    assert all(s % align == 0 and 0 < e - s <= max(tile, align) for s, e in cores)
