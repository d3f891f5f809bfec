import math

import pytest
import torch

from osediff.tiling.latent import gaussian_weights, tile_grid, tile_starts, tiled_apply


def test_gaussian_weights_formula_and_asymmetric_midpoints():
    w = gaussian_weights(96, 96)
    assert w.shape == (96, 96) and w.dtype == torch.float64
    norm = math.sqrt(2 * math.pi * 0.01)
    gx = lambda x: math.exp(-((x - 95 / 2) ** 2) / 96**2 / 0.02) / norm  # noqa: E731
    gy = lambda y: math.exp(-((y - 96 / 2) ** 2) / 96**2 / 0.02) / norm  # noqa: E731
    for y, x in [(0, 0), (48, 47), (10, 80), (95, 95)]:
        assert w[y, x].item() == pytest.approx(gy(y) * gx(x), rel=1e-12)
    # x is symmetric about 47.5, y about 48: the reference's asymmetry is kept
    assert w[48, 0] == pytest.approx(w[48, 95].item())
    assert w[0, 40] != pytest.approx(w[95, 40].item())


def test_tile_starts_follow_the_reference_rule():
    assert tile_starts(128, 96, 32) == [0, 32]
    assert tile_starts(200, 96, 32) == [0, 64, 104]
    assert tile_starts(96, 96, 32) == [0]
    for size in range(97, 600, 7):
        s = tile_starts(size, 96, 32)
        n = len(s)
        assert (n - 1) * 64 + 96 >= size and (n - 2) * 64 + 96 < size  # the smallest such n
        assert s[-1] == size - 96 and s[0] == 0


@pytest.mark.parametrize("hw,tiled", [((96, 96), False), ((128, 64), False), ((64, 128), False), ((128, 128), True),
                                      ((97, 96), True)])
def test_tiling_is_decided_by_area(hw, tiled):
    th, tw, origins = tile_grid(*hw, 96, 32)
    assert (len(origins) > 1 or (th, tw) != hw) == tiled


@pytest.mark.parametrize("h,w", [(512, 32), (32, 512), (600, 20), (1, 10000), (40, 40 * 7)])
def test_grid_terminates_and_covers_elongated_shapes(h, w):
    # the reference loops forever when min(h, w) <= overlap and h·w > tile² (spec §8.8b)
    th, tw, origins = tile_grid(h, w, 96, 32)
    cover = torch.zeros(h, w, dtype=torch.bool)
    for y, x in origins:
        assert y + th <= h and x + tw <= w
        cover[y:y + th, x:x + tw] = True
    assert cover.all() and len(origins) < 1000


def test_square_tiles_of_min_side_when_side_exceeds_overlap():
    th, tw, origins = tile_grid(200, 50, 96, 32)  # reference: T = min(96, 50) = 50 square tiles
    assert (th, tw) == (50, 50)
    assert sorted({y for y, _ in origins}) == tile_starts(200, 50, 32)


def test_tiled_apply_of_identity_is_identity_and_batching_is_invisible():
    z = torch.randn(2, 4, 150, 130)
    calls = []

    def fn(t):
        calls.append(t.shape[0])
        return t * 2 + 1

    one = tiled_apply(fn, z, 96, 32, tile_batch=1)
    assert torch.allclose(one, z * 2 + 1, atol=1e-5)
    n_single = len(calls)
    calls.clear()
    four = tiled_apply(fn, z, 96, 32, tile_batch=4)
    assert len(calls) < n_single and max(calls) == 8  # 4 tiles × batch 2 per call
    assert torch.equal(one, four)


def test_tiled_apply_blends_with_gaussian_weights():
    # a function that depends on the tile position makes the blend visible: check one overlapped pixel
    z = torch.zeros(1, 1, 1, 1).expand(1, 1, 128, 96).clone()
    counter = iter(range(100))
    out = tiled_apply(lambda t: torch.full_like(t, float(next(counter))), z, 96, 32)
    w = gaussian_weights(96, 96)
    y = 40  # rows 32..95 are covered by tile 0 (value 0, rows 0..95) and tile 1 (value 1, rows 32..127)
    expected = (0 * w[y, 10] + 1 * w[y - 32, 10]) / (w[y, 10] + w[y - 32, 10])
    assert out[0, 0, y, 10].item() == pytest.approx(expected.item(), rel=1e-5)
