import torch

from osediff.core.colorfix import adain, color_fix, wavelet, wavelet_decompose


def test_adain_matches_hand_computed_values():
    x = torch.tensor([0.0, 0.2, 0.4, 0.6]).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    ref = torch.tensor([0.5, 0.5, 0.6, 0.6]).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    mx, vx = 0.3, ((0.3**2 + 0.1**2) * 2) / 3  # unbiased variance
    mr, vr = 0.55, (4 * 0.05**2) / 3
    sx, sr = (vx + 1e-5) ** 0.5, (vr + 1e-5) ** 0.5
    expected = (torch.tensor([0.0, 0.2, 0.4, 0.6]) - mx) / sx * sr + mr
    assert torch.allclose(adain(x, ref)[0, 0].flatten(), expected, atol=1e-6)


def test_adain_takes_reference_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 0.3
    ref = torch.rand(2, 3, 16, 16, generator=g) * 0.5 + 0.25
    out = adain(x, ref)
    assert torch.allclose(out.mean((2, 3)), ref.mean((2, 3)), atol=1e-5)
    assert torch.allclose(out.std((2, 3)), ref.std((2, 3)), atol=1e-3)


def test_wavelet_decomposition_reconstructs_and_transfers_low_frequencies():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 40, 40, generator=g)
    high, low = wavelet_decompose(x)
    assert torch.allclose(high + low, x, atol=1e-6)
    assert torch.allclose(wavelet(x, x), x.clamp(0, 1), atol=1e-6)
    # a constant image has no high frequencies: wavelet(x, c) keeps x's detail on c's colour
    c = torch.full_like(x, 0.5)
    out = wavelet(c, x)
    assert torch.allclose(out, low.clamp(0, 1), atol=1e-6)


def test_wavelet_blur_is_the_binomial_kernel_with_replicate_padding():
    from osediff.core.colorfix import _blur

    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 16
    k = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]])
    assert torch.allclose(_blur(x, 1)[0, 0, 1:4, 1:4], k)
    y = _blur(x, 2)  # dilation 2: taps two pixels apart
    assert y[0, 0, 2, 2] == 4 and y[0, 0, 0, 2] == 2 and y[0, 0, 1, 2] == 0


def test_none_is_identity():
    x = torch.rand(1, 3, 4, 4)
    assert color_fix(x, torch.rand(1, 3, 4, 4), "none") is x
