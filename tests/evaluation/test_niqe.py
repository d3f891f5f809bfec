"""NIQE: the authors' RealSR log (spec §5.1, §5.2) and properties of each step that could break."""

from __future__ import annotations

import hashlib
import math
import re
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from osediff.evaluation import niqe as N
from osediff.evaluation.evaluate import read_rgb

REALSR = Path(__file__).resolve().parents[3] / "shared" / "benchmarks" / "realsr"
LOG_LINE = re.compile(r"results_osediff/(\S+)\.png \|.*?NIQE: ([\d.]+);")
# The two images whose float32 rounding is hardest to get right, and four others.
HANDFUL = ("Nikon_024_LR4", "Nikon_008_LR4", "Canon_001_LR4", "Canon_006_LR4", "Canon_014_LR4", "Nikon_050_LR4")


def logged_niqe() -> tuple[dict[str, float], float]:
    text = (REALSR / "osediff_metrics.log").read_text()
    mean = float(re.search(r"NIQE: ([\d.]+)", text.split("Average Metrics")[1])[1])
    return {m[1]: float(m[2]) for m in LOG_LINE.finditer(text)}, mean


def test_reproduces_a_handful_of_the_authors_values():
    logged, _ = logged_niqe()
    for name in HANDFUL:
        value = N.niqe(read_rgb(REALSR / "osediff" / f"{name}.png"))
        # The log has 6 decimals; we measured at most 1.7e-5 over all 100 images (the issue asks for 1e-3).
        assert value == pytest.approx(logged[name], abs=1e-4), name


def test_reproduces_all_100_images_and_the_mean():
    logged, mean = logged_niqe()
    assert len(logged) == 100 and mean == 5.6476
    ours = {name: N.niqe(read_rgb(REALSR / "osediff" / f"{name}.png")) for name in logged}
    worst = max(ours, key=lambda n: abs(ours[n] - logged[n]))
    assert abs(ours[worst] - logged[worst]) <= 1e-4, (worst, ours[worst], logged[worst])
    assert round(float(np.mean(list(ours.values()))), 4) == mean


# ---------------------------------------------------------------------------------------------- pieces
def test_pristine_model_is_the_shipped_file():
    data = (files("osediff") / "data" / N.PRISTINE_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == N.PRISTINE_SHA256
    mu, cov = N.pristine_model()
    assert mu.shape == (36,) and cov.shape == (36, 36)
    np.testing.assert_allclose(cov, cov.T, atol=1e-12)
    assert np.all(np.linalg.eigvalsh(cov) > 0)


def test_luma_levels_and_the_8bit_input_path():
    white, black = np.ones((3, 2, 2)), np.zeros((3, 2, 2))
    assert np.all(N.rgb_to_y255(white) == 255) and np.all(N.rgb_to_y255(black) == 0)
    k = np.arange(256, dtype=np.float64)
    x = N._float32_input(k / 255)
    np.testing.assert_array_equal(x, k.astype(np.float32) * (np.float32(1) / np.float32(255)))
    assert np.sum(x != (k / 255).astype(np.float32)) > 0  # the reciprocal really differs for some levels
    odd = np.array([0.1234567])  # not an 8-bit level: plain float32
    assert N._float32_input(odd)[0] == np.float32(0.1234567)


def test_gaussian_window_is_matlab_fspecial():
    k = N.gaussian_kernel()
    assert k.shape == (7, 7) and k.sum() == pytest.approx(1, abs=1e-7)
    np.testing.assert_array_equal(k, k.T)
    np.testing.assert_array_equal(k, k[::-1])
    assert k[3, 3] == k.max() and k[3, 4] / k[3, 3] == pytest.approx(math.exp(-1 / (2 * (7 / 6) ** 2)), rel=1e-6)


def test_replicate_filter_keeps_constants_and_pads_by_the_edge():
    x = np.full((9, 11), 42.0)
    np.testing.assert_allclose(N.filter_replicate(x, N.gaussian_kernel()), 42.0 * N.gaussian_kernel().sum())
    delta = np.zeros((7, 7))
    delta[3, 4] = 1  # correlation with a shifted delta reads the right neighbour; the last column repeats
    ramp = np.tile(np.arange(11.0), (9, 1))
    out = N.filter_replicate(ramp, delta)
    np.testing.assert_array_equal(out[:, :-1], ramp[:, 1:])
    np.testing.assert_array_equal(out[:, -1], ramp[:, -1])


def test_mscn_of_a_constant_is_about_zero_and_of_noise_is_normalised():
    # 0 up to the float32-rounded window summing to 1 - 1e-8, as in pyiqa
    assert np.abs(N.mscn(np.full((20, 20), 100.0))).max() < 1e-5
    rng = np.random.default_rng(0)
    z = N.mscn(rng.normal(128, 40, (200, 200)))
    assert abs(z.mean()) < 0.02 and 0.7 < z.std() < 1.0  # σ + 1 in the denominator shrinks it a little


def test_imresize_taps_are_normalised_and_mirror_inside_the_image():
    index, weight = N.imresize_taps(480, 240)
    assert index.shape == weight.shape == (240, 10)
    np.testing.assert_allclose(weight.sum(axis=1), 1, atol=1e-12)
    assert index.min() == 0 and index.max() == 479
    assert list(index[0, :6]) == [3, 2, 1, 0, 0, 1]  # positions -4..1: symmetric, edge pixel repeated


def test_imresize_halves_constants_and_linear_ramps_exactly():
    np.testing.assert_allclose(N.imresize(np.full((8, 12), 0.3), 0.5), 0.3, atol=1e-15)
    # Keys' cubic reproduces linear functions: away from the border, row i samples position 2i + 0.5.
    ramp = np.tile(np.arange(32.0), (4, 1))
    half = N.imresize(ramp, 0.5)
    assert half.shape == (2, 16)
    np.testing.assert_allclose(half[:, 2:-2], np.tile(2 * np.arange(2, 14) + 0.5, (2, 1)), atol=1e-12)


def test_aggd_fit_recovers_gaussian_and_laplacian_shapes():
    rng = np.random.default_rng(1)
    gauss = rng.normal(0, 1, (1, 300, 300))
    alpha, beta_l, beta_r, mean = N.aggd_fit(gauss)
    assert alpha[0] == pytest.approx(2, abs=0.05)
    assert beta_l[0] == pytest.approx(math.sqrt(2), rel=0.02) and beta_r[0] == pytest.approx(math.sqrt(2), rel=0.02)
    assert abs(mean[0]) < 0.02
    alpha, *_ = N.aggd_fit(rng.laplace(0, 1, (1, 300, 300)))
    assert alpha[0] == pytest.approx(1, abs=0.05)


def test_a_block_without_negative_values_gives_nan_scales_that_the_fit_ignores():
    rng = np.random.default_rng(2)
    blocks = rng.normal(0, 1, (4, 16, 16))
    blocks[2] = np.abs(blocks[2]) + 0.1
    alpha, beta_l, _, _ = N.aggd_fit(blocks)
    assert np.isnan(beta_l[2]) and not np.isnan(alpha[2]) and not np.isnan(beta_l[[0, 1, 3]]).any()
    feats = rng.normal(0, 1, (30, 36))
    mu_p, cov_p = N.pristine_model()
    with_nan = np.vstack([feats, np.full((1, 36), np.nan)])
    assert N.niqe_distance(with_nan, mu_p, cov_p) == pytest.approx(N.niqe_distance(feats, mu_p, cov_p), rel=1e-12)


def test_pinv_matches_the_inverse_of_a_well_conditioned_matrix():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(6, 6)) + 6 * np.eye(6)
    np.testing.assert_allclose(N.pinv(a), np.linalg.inv(a), atol=1e-12)
    singular = np.diag([1.0, 2.0, 0.0])
    np.testing.assert_allclose(N.pinv(singular), np.diag([1.0, 0.5, 0.0]))


def test_blur_raises_niqe_and_batches_match_single_images():
    hr = read_rgb(REALSR / "HR" / "Canon_001_LR4.png")[:, :192, :192]
    blurred = (hr + np.roll(hr, 1, 1) + np.roll(hr, 1, 2) + np.roll(hr, (1, 1), (1, 2))) / 4
    blurred = (blurred + np.roll(blurred, 1, 1) + np.roll(blurred, 1, 2) + np.roll(blurred, (1, 1), (1, 2))) / 4
    sharp, soft = N.niqe(hr), N.niqe(blurred)
    assert soft > sharp + 1
    np.testing.assert_allclose(N.niqe(np.stack([hr, blurred])), [sharp, soft], rtol=1e-12)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="at least 96"):
        N.niqe(np.zeros((3, 95, 200)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        N.niqe(np.full((3, 96, 96), 2.0))
    with pytest.raises(ValueError, match="RGB"):
        N.niqe(np.zeros((96, 96)))
