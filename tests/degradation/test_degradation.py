"""Degradation pipelines (spec §4.3, §4.7), their kernels and JPEG: CPU, seeded, no network."""

from __future__ import annotations

import argparse
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from osediff.degradation import kernels as K
from osediff.degradation.face import FaceDegradationConfig, degrade_face
from osediff.degradation.jpeg import dct_matrix, jpeg
from osediff.degradation.realesrgan import (
    DOWN,
    KEEP,
    UP,
    DegradationConfig,
    add_gaussian_noise,
    add_poisson_noise,
    blur,
    categorical,
    degrade,
    sample_degradation,
    sample_mixed_kernels,
)

CFG = DegradationConfig()


def smooth_images(b: int, h: int, w: int, seed: int = 0, coarse: int = 8) -> torch.Tensor:
    """Bicubic-upsampled noise: image-like content in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, coarse, coarse, generator=g)
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ config


def test_config_defaults_are_the_shipped_files():
    assert DegradationConfig.from_yaml() == DegradationConfig()
    assert FaceDegradationConfig.from_yaml() == FaceDegradationConfig()


def test_config_rejects_unknown_and_missing_keys(tmp_path):
    path = tmp_path / "deg.yml"
    path.write_text("blur_kernel_size: 41\nkernel_list: ['iso']\nkernel_prob: [1.0]\nblur_sigma: [1, 15]\n"
                    "downsample_range: [1, 30]\nnoise_range: [0, 20]\njpeg_range: [30, 100]\n")
    assert FaceDegradationConfig.from_yaml(path).kernel_list == ("iso",)
    path.write_text(path.read_text() + "typo_prob: 0.5\n")
    with pytest.raises(ValueError, match="unknown keys"):
        FaceDegradationConfig.from_yaml(path)
    path.write_text("scale: 4\n")
    with pytest.raises(ValueError, match="missing keys"):
        DegradationConfig.from_yaml(path)
    with pytest.raises(ValueError, match="gray_prob"):
        DegradationConfig(gray_prob=0.1)


# --------------------------------------------------------------------------------------------- pipeline


def test_degrade_shapes_range_and_8bit_grid():
    hq = smooth_images(2, 80, 96)
    lq = degrade(hq, CFG, gen(0))
    assert lq.shape == hq.shape and lq.dtype == hq.dtype
    assert lq.min() >= 0 and lq.max() <= 1
    # k / 255 up to float rounding (exact on the CPU; CUDA divides by a scalar through its reciprocal)
    torch.testing.assert_close(lq * 255, (lq * 255).round(), atol=1e-4, rtol=0)
    small = degrade(hq, CFG, gen(0), resize_back=False)
    assert small.shape == (2, 3, 20, 24)
    torch.testing.assert_close(small * 255, (small * 255).round(), atol=1e-4, rtol=0)
    assert (lq - hq).abs().mean() > 1e-3  # it did degrade


def test_degrade_is_reproducible_per_seed():
    hq = smooth_images(2, 80, 80)
    a, b, c = degrade(hq, CFG, gen(7)), degrade(hq, CFG, gen(7)), degrade(hq, CFG, gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # each batch element gets its own degradation
    twins = degrade(hq[:1].expand(2, -1, -1, -1).contiguous(), CFG, gen(7))
    assert not torch.equal(twins[0], twins[1])


def test_degrade_rejects_bad_inputs():
    with pytest.raises(ValueError, match="too small"):
        degrade(torch.rand(1, 3, 40, 40), CFG, gen(0))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        degrade(torch.rand(1, 1, 80, 80), CFG, gen(0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        degrade(torch.rand(1, 3, 80, 80) * 2, CFG, gen(0))


@pytest.fixture(scope="module")
def draws():
    return sample_degradation(CFG, 4000, gen(123))


def _close(freq: torch.Tensor | float, p: float, n: int) -> bool:
    return abs(float(freq) - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9


def test_sampled_choices_follow_the_configured_probabilities(draws):
    n = 4000
    s1, s2 = draws.stage1, draws.stage2
    for stage, probs in ((s1, CFG.resize_prob), (s2, CFG.resize_prob2)):
        for k, p in zip((UP, DOWN, KEEP), probs):
            assert _close((stage.updown == k).double().mean(), p, n)
        for m in range(3):
            assert _close((stage.mode == m).double().mean(), 1 / 3, n)
        assert _close(stage.gaussian.double().mean(), 0.5, n)
        assert _close(stage.gray.double().mean(), 0.4, n)
        assert _close(stage.kernel.sinc.double().mean(), 0.1, n)
        mixed = stage.kernel.kind[~stage.kernel.sinc]
        for k, p in enumerate(CFG.kernel_info.kernel_prob):
            assert _close((mixed == k).double().mean(), p, len(mixed))
        for size in range(7, 22, 2):
            assert _close((stage.kernel.size == size).double().mean(), 1 / 8, n)
    assert s1.blur.all()
    assert _close(s2.blur.double().mean(), 0.8, n)
    assert _close(draws.final_sinc.double().mean(), 0.8, n)
    assert _close(draws.resize_first.double().mean(), 0.5, n)

    # the ranges of the continuous draws
    up, down = s1.scale[s1.updown == UP], s1.scale[s1.updown == DOWN]
    assert up.min() >= 1 and up.max() <= 1.5 and down.min() >= 0.15 and down.max() <= 1
    assert torch.all(s1.scale[s1.updown == KEEP] == 1)
    assert s2.scale.min() >= 0.3 and s2.scale.max() <= 1.2
    assert s1.sigma.min() >= 1 and s1.sigma.max() <= 30 and s2.sigma.max() <= 25
    assert s1.quality.min() >= 30 and s1.quality.max() <= 95 and draws.final_quality.max() <= 95


def test_sampled_kernels_are_normalised_symmetric_and_truncated(draws):
    for kernel, size in ((draws.stage1.kernel.kernel, draws.stage1.kernel.size),
                         (draws.stage2.kernel.kernel, draws.stage2.kernel.size)):
        k = kernel[:500].double()
        torch.testing.assert_close(k.sum(dim=(1, 2)), torch.ones(500, dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(k, k.flip(1, 2), atol=1e-7, rtol=0)  # point symmetry
        x, y = K.offsets(21)
        outside = (x.abs() > (size[:500, None, None] - 1) / 2) | (y.abs() > (size[:500, None, None] - 1) / 2)
        assert torch.all(k[outside] == 0)
    pulse = draws.final_kernel[~draws.final_sinc]
    assert torch.all(pulse[:, 10, 10] == 1) and torch.all(pulse.sum(dim=(1, 2)) == 1)


def test_categorical_frequencies():
    idx = categorical(gen(0), 10_000, (0.45, 0.25, 0.0, 0.3))
    assert (idx == 2).sum() == 0
    for k, p in ((0, 0.45), (1, 0.25), (3, 0.3)):
        assert _close((idx == k).double().mean(), p, 10_000)


# ----------------------------------------------------------------------------------------------- kernels


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def test_gaussian_kernels_follow_the_formula():
    k = K.gaussian_kernel(21, _t(1.0), _t(1.0), _t(0.0))[0]
    assert math.isclose(k.sum().item(), 1.0, abs_tol=1e-12)
    assert math.isclose((k[10, 11] / k[10, 10]).item(), math.exp(-0.5), rel_tol=1e-12)
    assert math.isclose((k[11, 11] / k[10, 10]).item(), math.exp(-1.0), rel_tol=1e-12)
    torch.testing.assert_close(k, k.T)
    torch.testing.assert_close(k, k.flip(0))
    # anisotropic: σx along columns at θ = 0; a quarter turn swaps the axes
    a = K.gaussian_kernel(21, _t(3.0), _t(1.0), _t(0.0))[0]
    assert math.isclose((a[10, 13] / a[10, 10]).item(), math.exp(-0.5), rel_tol=1e-12)
    assert math.isclose((a[11, 10] / a[10, 10]).item(), math.exp(-0.5), rel_tol=1e-12)
    torch.testing.assert_close(a, a.flip(0))
    torch.testing.assert_close(a, a.flip(1))
    torch.testing.assert_close(K.gaussian_kernel(21, _t(3.0), _t(1.0), _t(math.pi / 2))[0], a.T)
    rotated = K.gaussian_kernel(21, _t(3.0), _t(1.0), _t(0.7))[0]
    torch.testing.assert_close(rotated, rotated.flip(0, 1))


def test_generalized_and_plateau_kernels():
    args = (_t(2.0, 2.5), _t(1.0, 1.5), _t(0.3, -1.0))
    beta_one = K.generalized_gaussian_kernel(21, *args, _t(1.0, 1.0))
    torch.testing.assert_close(beta_one, K.gaussian_kernel(21, *args))
    p = K.plateau_kernel(21, _t(2.0), _t(2.0), _t(0.0), _t(1.5))[0]
    q = 1.0 / 4  # offset (1, 0) with σ = 2
    assert math.isclose((p[10, 11] / p[10, 10]).item(), 1 / (1 + q ** 1.5), rel_tol=1e-12)
    for k in (K.generalized_gaussian_kernel(21, *args, _t(0.5, 4.0)),
              K.plateau_kernel(21, *args, _t(1.0, 2.0))):
        torch.testing.assert_close(k.sum(dim=(1, 2)), _t(1.0, 1.0))
        torch.testing.assert_close(k, k.flip(1, 2))


def test_sinc_kernel_is_the_disc_lowpass():
    k = K.sinc_kernel(21, _t(math.pi))[0]
    assert math.isclose(k.sum().item(), 1.0, abs_tol=1e-12)
    j1_pi = 0.28461534317975275  # J1(π)
    # h(1) / h(0) = [π J1(π) / (2π)] / [π² / (4π)] = 2 J1(π) / π
    assert math.isclose((k[10, 11] / k[10, 10]).item(), 2 * j1_pi / math.pi, rel_tol=1e-9)
    torch.testing.assert_close(k, k.T)
    torch.testing.assert_close(k, k.flip(0))
    # a lower cutoff spreads the kernel
    assert K.sinc_kernel(21, _t(math.pi / 5))[0, 10, 10] < k[10, 10]


def test_truncate_equals_building_small_and_padding():
    big = K.gaussian_kernel(21, _t(2.0), _t(1.0), _t(0.4))
    small = K.gaussian_kernel(7, _t(2.0), _t(1.0), _t(0.4))
    torch.testing.assert_close(K.truncate(big, torch.tensor([7])), F.pad(small, (7, 7, 7, 7)))
    sinc = K.truncate(K.sinc_kernel(21, _t(1.5)), torch.tensor([9]))
    torch.testing.assert_close(sinc, F.pad(K.sinc_kernel(9, _t(1.5)), (6, 6, 6, 6)))


def test_mixed_kernels_iso_types_are_isotropic():
    kind, k = sample_mixed_kernels(gen(0), 200, 21, ("iso", "plateau_iso", "generalized_iso"), (0.4, 0.3, 0.3),
                                   (0.2, 3.0), (0.5, 4.0), (1.0, 2.0))
    assert set(kind.tolist()) == {0, 1, 2}
    torch.testing.assert_close(k, k.transpose(1, 2))
    torch.testing.assert_close(k.sum(dim=(1, 2)), torch.ones(200, dtype=torch.float64))


def test_blur_with_a_pulse_is_identity_and_preserves_constants():
    x = torch.rand(2, 3, 30, 30, generator=gen(0))
    assert torch.equal(blur(x, K.pulse_kernel(2, 21)), x)
    k = K.gaussian_kernel(21, _t(2.0, 1.0), _t(1.0, 3.0), _t(0.2, 1.0)).float()
    torch.testing.assert_close(blur(torch.full((2, 3, 30, 30), 0.3), k), torch.full((2, 3, 30, 30), 0.3))


# ------------------------------------------------------------------------------------------------- noise


def test_gray_noise_is_shared_by_the_channels():
    x = torch.full((2, 3, 16, 16), 0.5)
    gray = torch.tensor([True, False])
    y = add_gaussian_noise(x, _t(10.0, 10.0), gray, gen(0))
    assert torch.equal(y[0, 0], y[0, 1]) and torch.equal(y[0, 1], y[0, 2])
    assert not torch.equal(y[1, 0], y[1, 1])
    assert 8 / 255 < (y[1] - 0.5).std() < 12 / 255
    z = add_poisson_noise(x, _t(0.1, 0.1), gray, gen(0))
    assert torch.equal(z[0, 0], z[0, 1]) and torch.equal(z[0, 1], z[0, 2])
    assert not torch.equal(z[1, 0], z[1, 1])
    assert z.min() >= 0 and z.max() <= 1 and (z[1] - 0.5).abs().mean() > 0.01


# -------------------------------------------------------------------------------------------------- JPEG


def test_dct_matrix_is_orthonormal():
    d = dct_matrix(torch.float64)
    torch.testing.assert_close(d @ d.T, torch.eye(8, dtype=torch.float64))


def test_jpeg_quality_100_is_near_identity_and_lower_quality_hurts_more():
    # gray content isolates the codec from 4:2:0 chroma subsampling (alone a few levels on colour images)
    x = ((smooth_images(1, 64, 80, coarse=8)[:, :1] * 255).round() / 255).expand(1, 3, 64, 80)
    y = jpeg(x, 100.0)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean() < 0.5 / 255 and (y - x).abs().max() < 2 / 255
    textured = smooth_images(1, 64, 80, coarse=24)
    errors = [((jpeg(textured, q) - textured) ** 2).mean().item() for q in (95, 75, 50, 30)]
    assert errors == sorted(errors) and errors[0] < errors[-1] / 2


def _libjpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1] -> PIL/libjpeg's round trip (4:2:0), (H, W, 3) float in [0, 1]."""
    buf = io.BytesIO()
    arr = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(buf, "JPEG", quality=quality, subsampling="4:2:0")
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32) / 255)


def test_jpeg_per_sample_quality_and_agreement_with_libjpeg():
    x = (smooth_images(2, 48, 48, coarse=12) * 255).round() / 255
    both = jpeg(x, torch.tensor([40.0, 90.0]))
    torch.testing.assert_close(both[0:1], jpeg(x[0:1], 40.0))
    torch.testing.assert_close(both[1:2], jpeg(x[1:2], 90.0))
    # on a gray image (no chroma) the standard orientation matches PIL's libjpeg to within about a level
    gray = x[:1, :1].expand(1, 3, 48, 48)
    ours = jpeg(gray, 75.0, tables="standard")[0].permute(1, 2, 0)
    assert ((ours - _libjpeg(gray, 75)) ** 2).mean().sqrt() < 2 / 255


def test_libjpeg_uses_the_standard_orientation_not_the_reference_one():
    # textured gray content, so the high-frequency entries (where the two orientations differ) are at work
    gray = ((smooth_images(1, 64, 64, seed=2, coarse=40)[:, :1] * 255).round() / 255).expand(1, 3, 64, 64)
    for q in (30, 75):
        ref = _libjpeg(gray, q)
        err = {t: ((jpeg(gray, float(q), tables=t)[0].permute(1, 2, 0) - ref) ** 2).mean().item()
               for t in ("standard", "reference")}
        assert err["standard"] < err["reference"] / 2, (q, err)


def _basis_block(u: int, v: int, amplitude: float) -> torch.Tensor:
    """A 16×16 gray image (1, 3, 16, 16) in [0, 1]: every 8×8 block is 128 + amplitude·(DCT basis (u, v)),
    i.e. its only non-zero DCT coefficient is `amplitude` at vertical frequency u, horizontal frequency v."""
    d = dct_matrix(torch.float64)
    block = 128 + amplitude * torch.outer(d[u], d[v])  # X = Dᵀ F D with F = amplitude·e_(u,v)
    return (block.repeat(2, 2) / 255).expand(1, 3, 16, 16)


def test_jpeg_tables_orientation_on_single_dct_basis_blocks():
    # At q = 50 (scale 100 %) Annex K's luminance table K.1 has 11 at row 0, column 1 (vertical frequency 0,
    # horizontal 1) and 12 at row 1, column 0. A coefficient of 17 is quantised to round(17/11)·11 = 22 by the
    # standard orientation and to round(17/12)·12 = 12 by the transposed (reference) one, and vice versa for
    # the transposed basis block. The colour transform of a gray image leaves chroma flat (no chroma coefficient).
    cases = {("standard", 0, 1): 22, ("reference", 0, 1): 12, ("standard", 1, 0): 12, ("reference", 1, 0): 22}
    for (tables, u, v), kept in cases.items():
        y = jpeg(_basis_block(u, v, 17.0), 50.0, tables=tables)
        torch.testing.assert_close(y, _basis_block(u, v, float(kept)), rtol=0, atol=1e-9,
                                   msg=f"{tables} ({u}, {v})")
    # the tables themselves: the reference orientation is the transpose, and chroma (K.2) is symmetric
    from osediff.degradation.jpeg import quantisation_tables

    q = torch.tensor([50.0, 80.0], dtype=torch.float64)
    (ls, cs), (lr, cr) = quantisation_tables(q, "standard"), quantisation_tables(q, "reference")
    assert ls[0, 0, 1] == 11 and ls[0, 1, 0] == 12 and lr[0, 0, 1] == 12 and lr[0, 1, 0] == 11
    torch.testing.assert_close(lr, ls.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(cr, cs, rtol=0, atol=0)
    with pytest.raises(ValueError, match="jpeg tables"):
        quantisation_tables(q, "transposed")


def test_degradation_jpeg_tables_default_is_the_reference_and_standard_differs(tmp_path):
    assert DegradationConfig().jpeg_tables == "reference"
    assert DegradationConfig.from_yaml().jpeg_tables == "reference"  # the reference's YAML has no such key
    path = tmp_path / "deg.yml"
    text = (__import__("importlib").resources.files("osediff") / "data" / "params_realesrgan.yml").read_text()
    path.write_text(text + "\njpeg_tables: standard\n")
    assert DegradationConfig.from_yaml(path).jpeg_tables == "standard"
    with pytest.raises(ValueError, match="jpeg_tables"):
        DegradationConfig(jpeg_tables="libjpeg")
    hq = smooth_images(2, 80, 80, coarse=24)
    ref = degrade(hq, CFG, gen(1))
    std = degrade(hq, DegradationConfig(jpeg_tables="standard"), gen(1))
    assert not torch.equal(ref, std)
    # same random choices, only the tables differ: at q = 100 (all-ones tables) the two orientations agree
    import dataclasses

    lossless = dataclasses.replace(CFG, jpeg_range=(100.0, 100.0), jpeg_range2=(100.0, 100.0))
    torch.testing.assert_close(degrade(hq, lossless, gen(1)),
                               degrade(hq, dataclasses.replace(lossless, jpeg_tables="standard"), gen(1)))


# -------------------------------------------------------------------------------------------------- face


def test_face_degradation_shapes_and_reproducibility():
    hq = smooth_images(2, 64, 64)
    cfg = FaceDegradationConfig()
    a = degrade_face(hq, cfg, gen(3))
    assert a.shape == hq.shape and a.dtype == hq.dtype and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, degrade_face(hq, cfg, gen(3)))
    assert not torch.equal(a, degrade_face(hq, cfg, gen(4)))
    with pytest.raises(ValueError, match="too small"):
        degrade_face(torch.rand(1, 3, 16, 16), cfg, gen(0))


# --------------------------------------------------------------------------------------------------- CLI


def _parse(argv: list[str]) -> argparse.Namespace:
    from osediff.commands import degrade as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def test_degrade_cli_end_to_end(tmp_path, caplog):
    from osediff.commands import degrade as command

    hq_dir, lq_dir = tmp_path / "hq", tmp_path / "lq"
    hq_dir.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)).save(hq_dir / "a.png")
    Image.fromarray(rng.integers(0, 256, (88, 100, 3), dtype=np.uint8)).save(hq_dir / "b.jpg", quality=95)
    (hq_dir / "broken.png").write_bytes(b"\x89PNG not really")

    assert command.run(_parse([str(hq_dir), "-o", str(lq_dir), "--seed", "5"])) == 1
    assert "broken.png" in caplog.text
    assert sorted(p.name for p in lq_dir.iterdir()) == ["a.png", "b.png", "degradation.json"]
    assert Image.open(lq_dir / "a.png").size == (80, 96)
    assert Image.open(lq_dir / "b.png").size == (100, 88)
    first = np.asarray(Image.open(lq_dir / "a.png"))

    (hq_dir / "broken.png").unlink()
    assert command.run(_parse([str(hq_dir), "-o", str(lq_dir), "--seed", "5"])) == 0
    assert np.array_equal(np.asarray(Image.open(lq_dir / "a.png")), first)  # seeded per file name

    small = tmp_path / "small"
    assert command.run(_parse([str(hq_dir), "-o", str(small), "--no-resize-back"])) == 0
    assert Image.open(small / "a.png").size == (20, 24)
    standard = tmp_path / "standard"
    assert command.run(_parse([str(hq_dir), "-o", str(standard), "--seed", "5", "--jpeg-tables", "standard"])) == 0
    assert json.loads((standard / "degradation.json").read_text())["config"]["jpeg_tables"] == "standard"
    assert json.loads((lq_dir / "degradation.json").read_text())["config"]["jpeg_tables"] == "reference"
    assert not np.array_equal(np.asarray(Image.open(standard / "a.png")), first)
    face = tmp_path / "face"
    assert command.run(_parse([str(hq_dir), "-o", str(face), "--face", "--jpeg-tables", "standard"])) == 2
    assert command.run(_parse([str(hq_dir), "-o", str(face), "--face"])) == 0
    assert Image.open(face / "b.png").size == (100, 88)
