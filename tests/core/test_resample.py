import numpy as np
import pytest
import torch
from PIL import Image

from osediff.core.resample import guard_size, pad_to_multiple, resize_bicubic


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
