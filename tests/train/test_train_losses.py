"""The training losses (spec §4.6) as pure functions, on random tensors and stub scores."""

from __future__ import annotations

import torch

from osediff.core import schedule
from osediff.train import losses as L


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_vsd_gradient_is_two_g_over_n():
    z_hat = _rand(3, 4, 8, 8, seed=0).requires_grad_(True)
    x0_real, x0_fake = _rand(3, 4, 8, 8, seed=1), _rand(3, 4, 8, 8, seed=2)
    loss = L.vsd_loss(z_hat, x0_real, x0_fake)
    loss.backward()

    w = (z_hat.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)  # per sample
    g = (x0_fake - x0_real) / w
    n = z_hat.numel()
    torch.testing.assert_close(z_hat.grad, 2 * g / n)
    torch.testing.assert_close(loss.detach(), (g**2).mean())


def test_vsd_normalisation_is_per_sample():
    # Scaling one sample's residual |ẑ − x0_real| must rescale only that sample's gradient.
    z_hat = _rand(2, 4, 4, 4, seed=3).requires_grad_(True)
    x0_real, x0_fake = _rand(2, 4, 4, 4, seed=4), _rand(2, 4, 4, 4, seed=5)
    L.vsd_loss(z_hat, x0_real, x0_fake).backward()
    g1 = z_hat.grad.clone()
    z2 = z_hat.detach().clone()
    z2[1] = x0_real[1] + 2 * (z2[1] - x0_real[1])  # sample 1: w doubles
    z2.requires_grad_(True)
    L.vsd_loss(z2, x0_real, x0_fake).backward()
    torch.testing.assert_close(z2.grad[0], g1[0])
    torch.testing.assert_close(z2.grad[1], g1[1] / 2)


def test_vsd_x0_uses_negative_prompt_as_uncond_and_no_cfg_for_fake():
    b = 2
    alphas = schedule.alphas_cumprod()
    z_hat, eps = _rand(b, 4, 4, 4, seed=6), _rand(b, 4, 4, 4, seed=7)
    t = torch.tensor([20, 979])
    c, c_neg = torch.full((b, 77, 8), 1.0), torch.full((b, 77, 8), -1.0)
    calls = {}

    # Stub scores whose ε reveals the prompt they saw: ε = 0.1·mean(c)·z_t (+0.05 for the fake one).
    def real(z, tt, cc):
        calls["real"] = (z.shape[0], cc[:, 0, 0].tolist(), tt.tolist())
        return 0.1 * cc.mean(dim=(1, 2)).view(-1, 1, 1, 1) * z

    def fake(z, tt, cc):
        calls["fake"] = (z.shape[0], cc[:, 0, 0].tolist())
        return 0.1 * cc.mean(dim=(1, 2)).view(-1, 1, 1, 1) * z + 0.05

    x0_real, x0_fake = L.vsd_x0(z_hat, t, eps, alphas, c, c_neg, real, fake, cfg=7.5)
    assert calls["real"] == (2 * b, [-1.0, -1.0, 1.0, 1.0], [20, 979, 20, 979])  # [c_neg, c] in one batch
    assert calls["fake"] == (b, [1.0, 1.0])

    ab = alphas[t].view(-1, 1, 1, 1)
    z_t = ab.sqrt() * z_hat + (1 - ab).sqrt() * eps
    eps_real = -0.1 * z_t + 7.5 * (0.1 * z_t - (-0.1 * z_t))  # ε_u + s(ε_c − ε_u)
    torch.testing.assert_close(x0_real, (z_t - (1 - ab).sqrt() * eps_real) / ab.sqrt())
    torch.testing.assert_close(x0_fake, (z_t - (1 - ab).sqrt() * (0.1 * z_t + 0.05)) / ab.sqrt())
    assert not x0_real.requires_grad and x0_real.dtype == torch.float32


def test_vsd_is_zero_when_fake_equals_real():
    z_hat = _rand(2, 4, 4, 4, seed=8).requires_grad_(True)
    x0 = _rand(2, 4, 4, 4, seed=9)
    loss = L.vsd_loss(z_hat, x0, x0.clone())
    loss.backward()
    assert loss.item() == 0 and torch.all(z_hat.grad == 0)


def test_diffusion_and_l2_losses():
    a, b = _rand(2, 4, 4, 4, seed=10), _rand(2, 4, 4, 4, seed=11)
    torch.testing.assert_close(L.diffusion_loss(a, b), ((a - b) ** 2).mean())
    torch.testing.assert_close(L.l2_loss(a.half(), b), ((a.half().float() - b) ** 2).mean())


def test_timesteps_cover_the_reference_ranges():
    g = torch.Generator().manual_seed(0)
    t = L.sample_timesteps(20000, 20, 980, g, "cpu")
    assert t.dtype == torch.long and t.min().item() == 20 and t.max().item() == 979
    t = L.sample_timesteps(20000, 0, 1000, g, "cpu")
    assert t.min().item() == 0 and t.max().item() == 999


def test_noised_matches_add_noise():
    alphas = schedule.alphas_cumprod()
    z0, eps, t = _rand(3, 4, 2, 2, seed=12), _rand(3, 4, 2, 2, seed=13), torch.tensor([0, 500, 999])
    ab = alphas[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(L.noised(z0, t, eps, alphas), ab.sqrt() * z0 + (1 - ab).sqrt() * eps)
