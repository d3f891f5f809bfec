"""PSNR/SSIM: the authors' numbers on RealSR (spec §5.1, §5.2), and properties that could break."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from osediff.evaluation.evaluate import read_rgb
from osediff.evaluation.metrics import EPS, _filter_valid, gaussian_window, psnr, rgb_to_y, ssim, ssim_map

REALSR = Path(__file__).resolve().parents[3] / "shared" / "benchmarks" / "realsr"
LOG_LINE = re.compile(r"results_osediff/(\S+)\.png \| PSNR: ([\d.]+); SSIM: ([\d.]+);")


def parse_log(path: Path) -> tuple[dict[str, tuple[float, float]], tuple[float, float]]:
    """{stem: (psnr, ssim)} from the per-image lines, and the logged (PSNR, SSIM) means."""
    text = path.read_text()
    per_image = {m[1]: (float(m[2]), float(m[3])) for m in LOG_LINE.finditer(text)}
    means = re.search(r"PSNR: ([\d.]+); SSIM: ([\d.]+); LPIPS", text.split("Average Metrics")[1])
    return per_image, (float(means[1]), float(means[2]))


@pytest.fixture(scope="module")
def realsr_scores() -> dict[str, tuple[float, float]]:
    scores = {}
    for hr_path in sorted((REALSR / "HR").glob("*.png")):
        sr, hr = read_rgb(REALSR / "osediff" / hr_path.name), read_rgb(hr_path)
        scores[hr_path.stem] = (psnr(sr, hr), ssim(sr, hr))
    return scores


def test_reproduces_the_authors_log_per_image(realsr_scores):
    logged, _ = parse_log(REALSR / "osediff_metrics.log")
    assert len(logged) == 100 and logged.keys() == realsr_scores.keys()
    bad = [(name, ours, logged[name]) for name, ours in realsr_scores.items()
           if abs(ours[0] - logged[name][0]) > 1e-4 or abs(ours[1] - logged[name][1]) > 1e-4]
    assert not bad, f"{len(bad)} images differ from the log by more than 1e-4, e.g. {bad[:3]}"


def test_reproduces_the_authors_means(realsr_scores):
    _, (psnr_mean, ssim_mean) = parse_log(REALSR / "osediff_metrics.log")
    assert (psnr_mean, ssim_mean) == (25.1511, 0.7341)
    values = np.array(list(realsr_scores.values()))
    assert round(values[:, 0].mean(), 4) == psnr_mean
    assert round(values[:, 1].mean(), 4) == ssim_mean


def test_spec_cross_check_values():
    # spec §5.1 recomputed these three PSNRs from the shipped images.
    for name, expected in (("Canon_001_LR4", 25.793725), ("Canon_002_LR4", 24.045863)):
        value = psnr(read_rgb(REALSR / "osediff" / f"{name}.png"), read_rgb(REALSR / "HR" / f"{name}.png"))
        assert value == pytest.approx(expected, abs=2e-6)


def _images(seed: int, shape=(3, 24, 20)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random(shape), rng.random(shape)


def test_luma_range_and_weights():
    white, black = np.ones((3, 2, 2)), np.zeros((3, 2, 2))
    np.testing.assert_allclose(rgb_to_y(white), 235 / 255)
    np.testing.assert_allclose(rgb_to_y(black), 16 / 255)
    green = np.zeros((3, 1, 1))
    green[1] = 1
    np.testing.assert_allclose(rgb_to_y(green), (16 + 128.553) / 255)


def test_psnr_of_a_uniform_shift_is_analytic():
    # A grey shift d in R, G and B moves Y by d·219/255 everywhere: PSNR = 10·log10(1 / (ΔY² + eps)).
    d = 0.1
    hr = np.full((3, 16, 16), 0.4)
    expected = 10 * np.log10(1 / ((d * 219 / 255) ** 2 + EPS))
    assert psnr(hr + d, hr) == pytest.approx(expected, abs=1e-10)


def test_identical_images_give_80_db_and_ssim_one():
    x, _ = _images(0)
    assert psnr(x, x) == pytest.approx(80.0)  # 10·log10(1 / 1e-8), never inf
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("a,b", [(0.0, 0.0), (0.0, 1.0), (0.3, 0.7), (1.0, 1.0)])
def test_constant_images_are_finite(a, b):
    sr, hr = np.full((3, 16, 16), a), np.full((3, 16, 16), b)
    s, p = ssim(sr, hr), psnr(sr, hr)
    assert np.isfinite(s) and 0 <= s <= 1 and np.isfinite(p)
    if a == b:
        assert s == pytest.approx(1.0) and p == pytest.approx(80.0)


def test_ssim_below_rounding_is_one():
    # SSIM sees Y rounded to integers in [0, 255]: a change far below half a grey level is invisible.
    x = np.full((3, 16, 16), 100 / 255)
    assert ssim(x + 1e-6, x) == 1.0
    assert psnr(x + 1e-6, x) < 80.0


def test_bad_inputs_raise():
    x, y = _images(1)
    with pytest.raises(ValueError, match="NaN"):
        ssim(np.where(x > 0.5, np.nan, x), y)
    with pytest.raises(ValueError, match="NaN"):
        psnr(x, np.full_like(y, np.inf))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        psnr(x * 255, y)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(x, y[:, :-1])
    with pytest.raises(ValueError, match="RGB"):
        psnr(x[:2], y[:2])
    with pytest.raises(ValueError, match="at least 11"):
        ssim(x[:, :10], y[:, :10])


def test_batch_equals_one_by_one_and_symmetric():
    x, y = _images(2, shape=(4, 3, 20, 18))
    np.testing.assert_allclose(psnr(x, y), [psnr(a, b) for a, b in zip(x, y)], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ssim(x, y), [ssim(a, b) for a, b in zip(x, y)], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ssim(x, y), ssim(y, x), atol=1e-12)
    assert isinstance(psnr(x[0], y[0]), float) and psnr(x, y).shape == (4,)


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")  # a core dependency; numpy arrays are the contract
    x, y = _images(3)
    assert ssim(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(ssim(x, y), abs=1e-6)


def test_separable_valid_filter_equals_the_2d_window():
    g = gaussian_window()
    assert g.shape == (11,) and g.sum() == pytest.approx(1.0) and np.allclose(g, g[::-1])
    assert g[5] / g[4] == pytest.approx(np.exp(1 / (2 * 1.5**2)))
    x = np.random.default_rng(4).random((15, 13))
    window = np.outer(g, g)
    direct = np.array([[np.sum(x[i:i + 11, j:j + 11] * window) for j in range(3)] for i in range(5)])
    np.testing.assert_allclose(_filter_valid(x, g), direct, atol=1e-12)


def test_ssim_map_clamps_anticorrelated_structure():
    # cs < 0 for an inverted pattern: pyiqa's ReLU makes the map 0 there rather than negative.
    checker = (np.indices((16, 16)).sum(0) % 2) * 200.0 + 20
    m = ssim_map(checker, 240 - checker)
    assert m.shape == (6, 6) and np.all(m >= 0) and m.max() == 0
