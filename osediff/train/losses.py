"""OSEDiff's training losses as pure functions, named after the paper's symbols (spec §4.6).

Generator:   L_G = λ_l2·L2(x̂_H, x_H) + λ_lpips·LPIPS(x̂_H, x_H) + λ_vsd·L_vsd(ẑ_H)
Fake score:  L_d = E‖ε_φ(z_t, t, c) − ε‖²  on the detached ẑ_H

The VSD gradient (DMD form, with DMD's normalisation; no time weighting):

    z_t  = √ᾱ_t·ẑ_H + √(1−ᾱ_t)·ε,  t ~ U{20..979}
    x0_real = x0(z_t, ε_uncond + s·(ε_cond − ε_uncond)),  "uncond" = the NEGATIVE prompt, s = 7.5
    x0_fake = x0(z_t, ε_φ(z_t, t, c))                       (no CFG)
    w = mean_{C,H,W} |ẑ_H − x0_real|,   g = (x0_fake − x0_real) / w
    L_vsd = mean((ẑ_H − sg(ẑ_H − g))²),  so  ∂L_vsd/∂ẑ_H = 2g/N  (N = B·C·H·W)

Scores are any callables `(z_t, t, c) -> ε`, so these functions hold no networks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from osediff.core.schedule import add_noise, x0_from_eps

Score = Callable[[Tensor, Tensor, Tensor], Tensor]  # (z_t (B,4,h,w), t (B,) long, c (B,77,D)) -> ε (B,4,h,w)


def l2_loss(x_hat: Tensor, x: Tensor) -> Tensor:
    """L2 = mean((x̂_H − x_H)²) over all pixels, images in [-1, 1] (spec §4.6 step 1)."""
    return F.mse_loss(x_hat.float(), x.float())


def sample_timesteps(batch: int, low: int, high: int, generator: torch.Generator,
                     device: torch.device | str) -> Tensor:
    """t ~ randint(low, high) per sample, (B,) long; VSD uses (20, 980), the fake score (0, 1000)."""
    return torch.randint(low, high, (batch,), generator=generator, device=device)


def cfg_eps(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ε_u + s·(ε_c − ε_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


@torch.no_grad()
def vsd_x0(z_hat: Tensor, t: Tensor, eps: Tensor, alphas_cumprod: Tensor, c: Tensor, c_neg: Tensor,
           eps_real: Score, eps_fake: Score, cfg: float,
           cfg_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(x0_real, x0_fake) of the noised ẑ_H, both float32 and without gradient (spec §4.6 step 2).

    z_hat (B,4,h,w); t (B,) long; eps (B,4,h,w) the forward-process noise; c, c_neg (B,77,D) the prompt and
    negative-prompt embeddings. The real score sees [c_neg, c] in one batch of 2B (CFG), the fake one c alone.
    `cfg_dtype`: dtype of the CFG sum; the reference computes it in the real score's dtype (fp16 in its fp16
    training; its cast back to fp32 is discarded), then x0 in float32.
    """
    alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = add_noise(z_hat.detach().float(), eps.float(), alpha_bar)
    x0_fake = x0_from_eps(z_t, eps_fake(z_t, t, c), alpha_bar)
    eps_u, eps_c = eps_real(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([c_neg, c])).to(cfg_dtype).chunk(2)
    x0_real = x0_from_eps(z_t, cfg_eps(eps_u, eps_c, cfg), alpha_bar)
    return x0_real, x0_fake


def vsd_loss(z_hat: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """L_vsd = mean((ẑ − sg(ẑ − g))²) with g = (x0_fake − x0_real)/w, w = mean_{C,H,W}|ẑ − x0_real| per sample.

    The value is mean(g²) and the gradient w.r.t. ẑ_H is 2g/N; gradients reach ẑ_H only (spec §4.6 step 2).
    """
    z = z_hat.float()
    with torch.no_grad():
        w = (z - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1), DMD's normalisation
        g = (x0_fake - x0_real) / w
        target = z - g
    return F.mse_loss(z, target)


def diffusion_loss(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """L_d = mean((ε_φ(z_t, t, c) − ε)²), the fake score's standard ε-MSE (spec §4.6 step 6)."""
    return F.mse_loss(eps_pred.float(), eps.float())


def noised(z0: Tensor, t: Tensor, eps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε with per-sample t (B,) (`scheduler.add_noise`)."""
    return add_noise(z0, eps, alphas_cumprod[t].view(-1, 1, 1, 1))
