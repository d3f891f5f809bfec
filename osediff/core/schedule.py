"""The DDPM noise schedule of SD 2.1-base and the one-step x0 formula (spec §1.8), as pure functions.

The reference calls `DDPMScheduler.step(eps, 999, z)` after `set_timesteps(1)`; with one inference step the
previous timestep is -1, alpha_prod_prev = 1, and the step returns exactly the x0 prediction (plus a
1e-10-scale noise term we drop). We compute x0 in closed form instead; `tests/test_schedule.py` checks that
this equals diffusers' scheduler.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
TIMESTEP = 999  # the single OSEDiff step (spec §0)
VAE_SCALING = 0.18215  # AutoencoderKL scaling_factor of SD 2.1-base (spec §1.6)


def alphas_cumprod(num_steps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START,
                   beta_end: float = BETA_END) -> torch.Tensor:
    """ᾱ_t for the "scaled_linear" schedule, float32, shape (num_steps,): betas = linspace(√b0, √b1)²."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def x0_from_eps(z_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """x̂0 = (z_t − √(1−ᾱ)·ε̂)/√ᾱ  (DDPM x0 prediction; OSEDiff eq. for t=999, spec §1.8).

    Computed in float32 like the reference (ᾱ is an fp32 tensor there, which promotes fp16 inputs), then
    returned in float32; `alpha_bar` broadcasts against z_t (a scalar or a (B,1,1,1) tensor).
    """
    a = torch.as_tensor(alpha_bar, dtype=torch.float32, device=z_t.device)
    return (z_t.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()


def add_noise(z0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε (DDPM forward process, `scheduler.add_noise`); ᾱ broadcasts (B,1,1,1)."""
    a = alpha_bar.to(device=z0.device, dtype=z0.dtype)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise
