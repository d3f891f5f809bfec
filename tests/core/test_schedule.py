import torch

from osediff.core import schedule


def test_constants_match_spec():
    a = schedule.alphas_cumprod()[999]
    assert a.dtype == torch.float32
    assert a.item() == 0.00466009508818388
    assert a.sqrt().item() == 0.06826488673686981
    assert (1 - a).sqrt().item() == 0.9976672530174255


def test_x0_closed_form_equals_ddpm_step_with_one_inference_step():
    from diffusers import DDPMScheduler

    from osediff.testing import SCHEDULER

    # diffusers 0.25 (the reference's pin) gives prev_t = 999 - 1000//1 = -1 for any spacing; newer diffusers
    # look 999 up in `timesteps`, which holds it only with "trailing" spacing. Both mean: step to x0.
    sched = DDPMScheduler.from_config(SCHEDULER, timestep_spacing="trailing")
    sched.set_timesteps(1)
    assert sched.previous_timestep(999) == -1
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ref = sched.step(eps, 999, z, generator=torch.Generator().manual_seed(1)).prev_sample
    ours = schedule.x0_from_eps(z, eps, schedule.alphas_cumprod()[999])
    # the DDPM step adds sqrt(1e-20)·N(0,1) noise; nothing else may differ
    assert (ours - ref).abs().max() < 1e-6
    assert torch.allclose(ours, 14.648819 * z - 14.614648 * eps, atol=1e-4)


def test_without_set_timesteps_the_scheduler_would_not_return_x0():
    # documents why the reference's set_timesteps(1) matters (spec §1.8): without it prev_t = 998.
    from diffusers import DDPMScheduler

    from osediff.testing import SCHEDULER

    sched = DDPMScheduler.from_config(SCHEDULER)
    z, eps = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    ours = schedule.x0_from_eps(z, eps, schedule.alphas_cumprod()[999])
    assert (sched.step(eps, 999, z).prev_sample - ours).abs().max() > 1e-2
