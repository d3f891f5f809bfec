"""Mixed-precision placement (spec §4.5, §4.6 "Precision"): under bf16 autocast on the CPU, one `Trainer.step`
with `--amp-placement reference` equals a literal replica of the authors' placement, written here with the
diffusers calls their training makes (`vae.encode(...).latent_dist.sample()`, `DDPMScheduler.step`,
`add_noise`, the UNets called directly), on the same tiny random networks and the same random draws."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from test_train_step import (  # noqa: F401 (one_thread: an autouse fixture)
    image_folder,
    new_trainer,
    one_thread,
    random_lpips,
    tiny_config,
    tiny_tagger,
)

TOL = {"rtol": 1e-5, "atol": 1e-6}  # fp32 rounding; bf16 rounding (what a different placement gives) is ~4e-3


def _trainer(tiny_sd, root, placement):
    cfg = tiny_config(tiny_sd, image_folder(root / "data", 3), root / f"run-{placement}",
                      data_kw={"prompts": "ram"}, optim_kw={"lr": 2e-3},
                      run_kw={"mixed_precision": "bf16", "amp_placement": placement})
    return new_trainer(cfg, lpips=random_lpips(), tagger=tiny_tagger())


def _encode_prompt(model, captions):
    """OSEDiff_gen.encode_prompt: one text-encoder call per caption, no grad (inside the caller's autocast)."""
    out = []
    with torch.no_grad():
        for caption in captions:
            ids = model.tokenizer(caption, max_length=model.tokenizer.model_max_length, padding="max_length",
                                  truncation=True, return_tensors="pt").input_ids
            out.append(model.text_encoder(ids)[0])
    return torch.cat(out)


def _eps_to_mu(scheduler, eps, sample, t):
    a = scheduler.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)[t]
    while a.ndim < sample.ndim:
        a = a.unsqueeze(-1)
    return (sample - (1 - a) ** 0.5 * eps) / a ** 0.5


def authors_step(tr, batch, g):
    """The reference's iteration (train_osediff.py, osediff.py) with its precision placement, our random draws
    (taken from `g` in our order) and our deliberate fixes (each trainable once in the clip). Returns the
    losses, the clipped generator and fake-score gradients."""
    from diffusers import DDPMScheduler

    m, real, fake, lpips = tr.model, tr.real.unet, tr.nets.fake.unet, tr.lpips
    sched = DDPMScheduler.from_pretrained(tr.cfg.model.base, subfolder="scheduler")
    sched.set_timesteps(1)
    # diffusers 0.25 (the reference's) takes the previous step as t - 1000 // num_inference_steps = -1, i.e.
    # ᾱ_prev = 1 and the step returns x0; newer versions look t = 999 up in `timesteps` and fail
    sched.previous_timestep = lambda t: t - sched.config.num_train_timesteps // sched.num_inference_steps
    weight_dtype, b = torch.bfloat16, batch.x_L.shape[0]
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731 (accelerate's autocast)

    # OSEDiff_gen.forward, wrapped by accelerate in autocast; its outputs converted to fp32
    with amp():
        z_L = m.vae.encode(batch.x_L).latent_dist.sample(generator=g) * m.vae.config.scaling_factor
        c = _encode_prompt(m, batch.prompts)
        c_neg = _encode_prompt(m, [tr.cfg.data.neg_prompt] * b)
        timesteps = torch.tensor([999]).long()
        eps_hat = m.unet(z_L, timesteps, encoder_hidden_states=c.to(torch.float32)).sample
        z_hat = sched.step(eps_hat, timesteps, z_L, return_dict=True).prev_sample
        x_hat = m.vae.decode(z_hat / m.vae.config.scaling_factor).sample.clamp(-1, 1)
    x_hat, z_hat, c, c_neg = (v.float() for v in (x_hat, z_hat, c, c_neg))

    # data losses outside autocast; LPIPS is a prepared module (autocast forward, fp32 output)
    l2 = F.mse_loss(x_hat.float(), batch.x_H.float())
    with amp():
        lp = lpips(x_hat.float(), batch.x_H.float())
    lp = lp.float().mean()

    # OSEDiff_reg.distribution_matching_loss, called directly: no autocast; unet_fix in pure bf16
    t = torch.randint(20, 980, (b,), generator=g)
    noise = torch.randn(z_hat.shape, generator=g)
    noisy = sched.add_noise(z_hat, noise, t)
    with torch.no_grad():
        e_fake = fake(noisy, timestep=t, encoder_hidden_states=c.float()).sample
        x0_fake = _eps_to_mu(sched, e_fake, noisy, t)
        e_fix = real(torch.cat([noisy] * 2).to(weight_dtype), timestep=torch.cat([t] * 2),
                     encoder_hidden_states=torch.cat([c_neg, c]).to(weight_dtype)).sample
        e_u, e_c = e_fix.chunk(2)
        e_fix = e_u + 7.5 * (e_c - e_u)
        x0_fix = _eps_to_mu(sched, e_fix, noisy, t)
    w = (z_hat - x0_fix).abs().mean(dim=[1, 2, 3], keepdim=True)
    vsd = F.mse_loss(z_hat, (z_hat - (x0_fake - x0_fix) / w).detach())

    grads_g = torch.autograd.grad(l2 + 2 * lp + vsd, tr.params_g)
    grads_g = _clipped(grads_g, 1.0)

    # OSEDiff_reg.diff_loss on the detached latent and prompt, fp32, no autocast
    t = torch.randint(0, 1000, (b,), generator=g)
    noise = torch.randn(z_hat.shape, generator=g)
    pred = fake(sched.add_noise(z_hat.detach(), noise, t), timestep=t, encoder_hidden_states=c.detach()).sample
    loss_d = F.mse_loss(pred.float(), noise.float())
    grads_f = _clipped(torch.autograd.grad(loss_d, tr.params_f), 1.0)
    return {"l2": l2.item(), "lpips": lp.item(), "vsd": vsd.item(), "fake": loss_d.item()}, grads_g, grads_f


def _clipped(grads, max_norm):
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(gr) for gr in grads]))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return [gr * scale for gr in grads]


def our_step(tr, batch, g):
    """Trainer.step, capturing the clipped gradients each optimiser is about to apply."""
    seen = {}
    hooks = [opt.optimizer.register_step_pre_hook(
        lambda o, a, k, key=key, params=params: seen.__setitem__(key, [p.grad.clone() for p in params]))
        for key, opt, params in (("g", tr.opt_g, tr.params_g), ("f", tr.opt_f, tr.params_f))]
    try:
        losses = tr.step(batch, g)
    finally:
        for h in hooks:
            h.remove()
    return vars(losses), seen["g"], seen["f"]


def _close(ours, theirs, **tol) -> bool:
    losses_o, g_o, f_o = ours
    losses_t, g_t, f_t = theirs
    try:
        for k in losses_t:
            torch.testing.assert_close(losses_o[k], losses_t[k], **tol, msg=k)
        for a, b in zip(g_o + f_o, g_t + f_t):
            torch.testing.assert_close(a, b, **tol)
    except AssertionError:
        return False
    return True


def test_reference_placement_equals_the_authors_under_bf16_autocast(tiny_sd, tmp_path):
    tr = _trainer(tiny_sd, tmp_path, "reference")
    assert tr.model.text_encoder.dtype == torch.float32 and tr.real.unet.dtype == torch.bfloat16
    raw = next(iter(tr.loader))
    batch = tr.make_batch(raw["hq"], raw["path"], torch.Generator().manual_seed(0))
    assert any(batch.prompts)
    # the prompt embeddings are the reference's: fp32 weights under autocast, one call per caption
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c_ref = _encode_prompt(tr.model, batch.prompts).float()
    assert not torch.equal(c_ref, _encode_prompt(tr.model, batch.prompts))  # autocast does change them
    torch.testing.assert_close(batch.c, c_ref, **TOL)

    theirs = authors_step(tr, batch, torch.Generator().manual_seed(5))
    ours = our_step(tr, batch, torch.Generator().manual_seed(5))
    assert _close(ours, theirs, **TOL), (ours[0], theirs[0])
    assert sum(gr.abs().sum() for gr in theirs[1]) > 0 and sum(gr.abs().sum() for gr in theirs[2]) > 0


def test_frozen_dtype_placement_differs_from_the_authors(tiny_sd, tmp_path):
    # the earlier osediff placement is not the authors' (so the test above can fail): its text encoder is in
    # bf16 weights outside autocast, its real score under autocast and its posterior noise fp32
    tr = _trainer(tiny_sd, tmp_path, "frozen-dtype")
    assert tr.model.text_encoder.dtype == torch.bfloat16
    raw = next(iter(tr.loader))
    batch = tr.make_batch(raw["hq"], raw["path"], torch.Generator().manual_seed(0))
    theirs = authors_step(tr, batch, torch.Generator().manual_seed(5))
    ours = our_step(tr, batch, torch.Generator().manual_seed(5))
    assert not _close(ours, theirs, **TOL)
    assert _close(ours, theirs, rtol=0.2, atol=0.05)  # the same computation, at bf16 precision
