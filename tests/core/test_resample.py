import numpy as np
import pytest
import torch
from PIL import Image

from osediff.core.resample import guard_size, output_size, pad_to_multiple, plan_sizes, resize_bicubic


@pytest.mark.parametrize("h,w,oh,ow", [(13, 17, 52, 68), (32, 32, 128, 128), (40, 30, 13, 11), (5, 7, 9, 21), (1, 3, 4, 12)])
def test_resize_equals_pil_bicubic(h, w, oh, ow):
    a = np.random.default_rng(0).random((h, w)).astype(np.float32)
    pil = np.asarray(Image.fromarray(a, mode="F").resize((ow, oh), Image.BICUBIC))
    ours = resize_bicubic(torch.from_numpy(a)[None, None], (oh, ow))[0, 0].numpy()
    assert np.abs(pil - ours).max() < 1e-5


def test_pad_to_multiple_reflects_and_reports_size():
    x = torch.arange(2 * 3 * 5 * 9, dtype=torch.float32).view(2, 3, 5, 9)
    y, (h, w) = pad_to_multiple(x, 8)
    assert y.shape == (2, 3, 8, 16) and (h, w) == (5, 9)
    assert torch.equal(y[..., :5, :9], x)
    assert torch.equal(y[..., 5, :9], x[..., 3, :])  # reflection about the last row
    y1, _ = pad_to_multiple(torch.rand(1, 3, 1, 1), 8)  # too small to reflect: replicate
    assert y1.shape == (1, 3, 8, 8)
    same, _ = pad_to_multiple(x[..., :8, :8].contiguous(), 8) if x.shape[-2] >= 8 else (None, None)
    z = torch.rand(1, 3, 16, 8)
    assert pad_to_multiple(z, 8)[0] is z


def test_guard_matches_reference_rule():
    assert guard_size(128, 128, 4, 512) is None
    assert guard_size(100, 200, 4, 512) == (128, 256)
    assert guard_size(300, 90, 4, 512) == (int(128 / 90 * 300), 128)
    assert guard_size(511, 600, 1, 512) == (512, int(512 / 511 * 600))


def test_output_size_rule():
    assert output_size(37, 45, 4) == (148, 180)
    assert output_size(5, 3, 2.5) == (13, 8)  # 12.5 and 7.5 round half up
    assert output_size(101, 33, 1.5) == (152, 50)  # 151.5 -> 152, 49.5 -> 50
    assert output_size(640, 480, long_side=3840) == (3840, 2880)
    assert output_size(480, 640, long_side=1000) == (750, 1000)
    assert output_size(333, 777, long_side=1001)[1] == 1001  # the long side is exact, whatever the rounding
    assert output_size(100, 100, 4, size=(3840, 2160)) == (3840, 2160)
    assert output_size(1, 1, 0.1) == (1, 1)  # never empty


@pytest.mark.parametrize("w,h,s", [(37, 45, 4), (300, 14, 4), (100, 200, 4), (511, 600, 1), (70, 66, 2), (1, 1, 4)])
def test_integer_scales_plan_the_reference_sizes(w, h, s):
    p = plan_sizes(w, h, (s * w, s * h), 512, max_guard_megapixels=0)
    g = guard_size(w, h, s, 512)
    assert p.guard == g and p.out == (s * w, s * h) and not p.capped
    assert p.up == ((g[0] * s, g[1] * s) if g else (s * w, s * h))  # the reference's im.resize((w*s, h*s))
    assert plan_sizes(w, h, (s * w, s * h), 512, 4.0) == p or p.up[0] * p.up[1] > 4e6  # the cap only bites above


def test_the_guard_cap_keeps_a_strip_a_strip():
    # the reference: 2000×2 ×4 -> guard 128000×128 -> processed 512000×512 = 262 megapixels
    ref = plan_sizes(2000, 2, (8000, 8), 512, max_guard_megapixels=0)
    assert ref.guard == (128000, 128) and ref.up == (512000, 512)
    p = plan_sizes(2000, 2, (8000, 8), 512, max_guard_megapixels=4.0)
    assert p.capped and p.out == (8000, 8) and p.up[0] * p.up[1] <= 4e6
    assert p.up[0] / p.up[1] == pytest.approx(1000, rel=0.1)  # same shape, just less enlarged
    assert plan_sizes(2000, 2, (8000, 8), 512, max_guard_megapixels=0.01) == type(p)(None, (8000, 8), (8000, 8), True)
    # with the default cap (4 MP), the guard is the reference's for aspect ratios up to 15:1 at ×4 (512² · 15 px)
    assert not plan_sizes(15 * 127, 127, (15 * 127 * 4, 127 * 4), 512, 4.0).capped
    assert plan_sizes(17 * 127, 127, (17 * 127 * 4, 127 * 4), 512, 4.0).capped


def test_fractional_scales_plan_a_guard_too():
    p = plan_sizes(50, 80, output_size(50, 80, 2.5), 512)  # threshold 512 // 2.5 = 204
    assert p.guard == (204, int(204 / 50 * 80)) and p.out == (125, 200)
    assert p.up == (510, round(2.5 * p.guard[1]))


def _dense_reference(in_size, out_size):
    """The dense float64 matrix the 16-bit path multiplied with before it took taps (kept here as the oracle)."""
    import math

    def cubic(x, a=-0.5):
        x = abs(x)
        return ((a + 2) * x - (a + 3)) * x * x + 1 if x < 1 else ((((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0)

    scale = in_size / out_size
    fs = max(scale, 1.0)
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        c = (i + 0.5) * scale
        lo, hi = max(int(c - 2 * fs + 0.5), 0), min(int(c + 2 * fs + 0.5), in_size)
        w = [cubic((j - c + 0.5) / fs) for j in range(lo, hi)]
        for j, wj in zip(range(lo, hi), w):
            m[i, j] = wj / math.fsum(w) if sum(w) else 0.0
    return m


@pytest.mark.parametrize("n,m", [(7, 28), (28, 7), (13, 5), (5, 13), (1, 4), (4, 1), (64, 64), (100, 37), (3, 300)])
def test_taps_are_the_dense_matrix(n, m):
    from osediff.core.resample import pil_bicubic_matrix

    assert torch.allclose(pil_bicubic_matrix(n, m), _dense_reference(n, m), rtol=0, atol=1e-15)


@pytest.mark.parametrize("size,out", [((12, 20), (48, 80)), ((48, 80), (17, 23)), ((9, 31), (31, 9)),
                                      ((16, 16), (16, 40)), ((5, 7), (5, 7))])
def test_banded_resize_equals_the_dense_product(size, out):
    """The 16-bit/tensor path: taps give what `M_y @ x @ M_x^T` (float32, as before) gave, to float rounding."""
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    my = _dense_reference(size[0], out[0]).float()
    mx = _dense_reference(size[1], out[1]).float()
    dense = my @ x @ mx.T
    got = resize_bicubic(x, out)
    assert got.shape == dense.shape and got.dtype == x.dtype
    assert (got - dense).abs().max() < 2e-6


def test_the_block_size_changes_only_rounding():
    """Blocks of output rows/columns are a way to order the work, not a different resample."""
    from osediff.core.resample import _resize_axis

    x = torch.rand(1, 3, 40, 30, generator=torch.Generator().manual_seed(1))
    for dim, n in ((-2, 97), (-1, 11), (-1, 64)):
        dense = _resize_axis(x, dim, n, block=10**6)  # one block: the whole dense matrix
        for b in (1, 3, 7):
            assert (_resize_axis(x, dim, n, block=b) - dense).abs().max() < 1e-6
