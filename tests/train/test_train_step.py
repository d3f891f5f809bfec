"""One training iteration (spec §4.5–§4.6) on a tiny random SD: what is trained, what gets gradients, and that a
few steps on a fixed batch lower the data loss. RAM prompts come from a tiny random tagger."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from osediff.train.config import DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig


def small_kernel_yaml(folder: Path) -> str:
    """The shipped Real-ESRGAN settings with 7-tap kernels, so 32² crops are large enough for them."""
    from importlib import resources

    text = (resources.files("osediff") / "data" / "params_realesrgan.yml").read_text()
    text = text.replace("blur_kernel_size: 21", "blur_kernel_size: 7").replace("blur_kernel_size2: 21",
                                                                               "blur_kernel_size2: 7")
    path = folder / "deg_small.yml"
    path.write_text(text)
    return str(path)


def image_folder(folder: Path, n: int, size: tuple[int, int] = (80, 72), seed: int = 0) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        # smooth random images: a coarse pattern upsampled, so the degradation and the losses have structure
        coarse = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize(size, Image.BICUBIC).save(folder / f"img{i}.png")
    return str(folder)


def tiny_config(sd: Path, data: str, out: Path, *, data_kw=None, model_kw=None, loss_kw=None, optim_kw=None,
                run_kw=None) -> TrainConfig:
    """A CPU-sized TrainConfig: 32² crops, fp32, no tracker, no workers, no LPIPS file (tests inject one)."""
    return TrainConfig(
        data=DataConfig(**{"data": (data,), "crop": 32, "degradation": small_kernel_yaml(out.parent),
                           "prompts": "none", "workers": 0, **(data_kw or {})}),
        model=ModelConfig(**{"base": str(sd), **(model_kw or {})}),
        loss=LossConfig(**(loss_kw or {})),
        optim=OptimConfig(**(optim_kw or {})),
        run=RunConfig(**{"output": str(out), "mixed_precision": "no", "batch_size": 2, "tracker": "none",
                         "max_steps": 2, "checkpoint_every": 1000, **(run_kw or {})}))


def random_lpips():
    from osediff.evaluation.lpips import LPIPS

    torch.manual_seed(0)
    m = LPIPS()
    for head in m.heads():  # released heads are non-negative
        head.weight.abs_()
    return m


def tiny_tagger():
    from osediff.dape import RAMConfig, RAMTagger

    cfg = RAMConfig(image_size=32, patch_size=4, embed_dim=8, depths=(1, 1), num_heads=(2, 2), window_size=4,
                    embed_width=8, hidden_size=16, head_layers=1, head_heads=2, intermediate_size=16, num_classes=5)
    torch.manual_seed(1)
    return RAMTagger(cfg, [f"tag{k}" for k in range(5)], [0.0, 0.0, 1.0, 0.0, 1.0]).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a shared 2-core machine makes two threads spin-wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def new_trainer(cfg: TrainConfig, **kw):
    """A Trainer on fresh accelerate singletons (each test process may build several Accelerators)."""
    from accelerate.state import AcceleratorState, GradientState

    from osediff.train.loop import Trainer

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Trainer(cfg, **kw)


@pytest.fixture(scope="module")
def trainer(tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("step")
    cfg = tiny_config(tiny_sd, image_folder(root / "data", 3), root / "run", data_kw={"prompts": "ram"},
                      optim_kw={"lr": 2e-3})
    return new_trainer(cfg, lpips=random_lpips(), tagger=tiny_tagger())


def fixed_batch(tr, seed=0, with_raw=False):
    raw = next(iter(tr.loader))
    batch = tr.make_batch(raw["hq"], raw["path"], torch.Generator().manual_seed(seed))
    return (batch, raw) if with_raw else batch


def test_trainable_set_is_lora_and_conv_in(trainer):
    from osediff.core import lora
    m = trainer.model
    names = {n for n, p in trainer.nets.generator.named_parameters() if p.requires_grad}
    expected = {f"model.unet.{n}" for n, _ in m.unet.named_parameters() if "lora_" in n}
    expected |= {"model.unet.conv_in.base_layer.weight", "model.unet.conv_in.base_layer.bias"}
    expected |= {f"model.vae.{n}" for n, _ in m.vae.named_parameters() if "lora_" in n}
    assert names == expected
    # every UNet adapter and the VAE adapter are there, each LoRA module with an A and a B
    targets = lora.unet_lora_targets(m.unet)
    for adapter, modules in trainer.nets.unet_targets.items():
        assert len([n for n in names if f".lora_A.{adapter}." in n and n.startswith("model.unet.")]) == len(modules)
    assert targets.keys() == trainer.nets.unet_targets.keys()
    assert all("encoder" in n or "quant_conv" in n for n in names if n.startswith("model.vae."))
    # the optimiser holds each trainable tensor exactly once (the reference lists conv_in's LoRA twice, §8.17)
    opt_params = [p for grp in trainer.opt_g.param_groups for p in grp["params"]]
    assert len(opt_params) == len({id(p) for p in opt_params}) == len(names)
    assert {id(p) for p in opt_params} == {id(p) for p in trainer.params_g}
    # frozen: text encoder, VAE decoder, the UNet's base weights, the real score
    assert not any(p.requires_grad for p in m.text_encoder.parameters())
    assert not any(p.requires_grad for p in m.vae.decoder.parameters())
    assert not any(p.requires_grad for p in trainer.real.parameters())


def test_fake_score_lora_is_mid_block_only(trainer, tiny_sd, tmp_path):
    from osediff.train.models import build_networks

    names = [n for n, p in trainer.nets.fake.named_parameters() if p.requires_grad]
    assert names and all(".default_others." in n and "mid_block" in n for n in names)
    assert trainer.nets.fake.unet.active_adapters() == ["default_others"]
    n_mid = len(trainer.nets.unet_targets["default_others"])
    assert len(names) == 2 * n_mid

    full = build_networks(str(tiny_sd), fake_lora="all").fake
    names_all = [n for n, p in full.named_parameters() if p.requires_grad]
    assert len(names_all) == 2 * sum(len(v) for v in trainer.nets.unet_targets.values())
    assert not any("conv_in.base_layer" in n for n in names_all)


def test_generator_at_init_equals_sd_and_fake_equals_real(trainer):
    # LoRA B = 0: the fake score equals the real one without CFG; the prompt embeddings come from RAM tags
    b, raw = fixed_batch(trainer, with_raw=True)
    assert b.prompts == trainer.tagger(raw["hq"]) and any(b.prompts)  # tags of the HQ, no suffix
    assert not any(p.endswith(",") for p in b.prompts)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    with torch.no_grad():
        torch.testing.assert_close(trainer.nets.fake(z, t, b.c), trainer.real(z, t, b.c))


def _with_loss(trainer, **weights):
    import dataclasses

    trainer.cfg = dataclasses.replace(trainer.cfg, loss=dataclasses.replace(trainer.cfg.loss, **weights))


def test_steps_on_a_fixed_batch_lower_the_data_loss_and_touch_only_trainables(trainer):
    # L2 + 2·LPIPS alone: on a random tiny SD the VSD direction is arbitrary, so it is switched off here and
    # tested on its own below.
    _with_loss(trainer, lambda_vsd=0.0)
    b = fixed_batch(trainer)
    gen = trainer.nets.generator
    before = {n: p.detach().clone() for n, p in gen.named_parameters()}
    fake_before = {n: p.detach().clone() for n, p in trainer.nets.fake.named_parameters()}
    real_before = [p.detach().clone() for p in trainer.real.parameters()]
    data_loss = []
    for _ in range(4):
        losses = trainer.step(b, torch.Generator().manual_seed(7))  # same batch, same noise
        data_loss.append(losses.l2 + 2 * losses.lpips)
        assert all(np.isfinite([losses.l2, losses.lpips, losses.vsd, losses.fake]))
    assert data_loss[-1] < data_loss[0] * 0.9 and data_loss == sorted(data_loss, reverse=True), data_loss

    changed = {n for n, p in gen.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in gen.named_parameters() if p.requires_grad}
    assert changed <= trainable
    assert any(".lora_B." in n and "model.unet." in n for n in changed)  # B moved away from 0
    assert any("model.vae." in n for n in changed)  # gradients reach the VAE-encoder LoRA
    assert "model.unet.conv_in.base_layer.weight" in changed
    fake_changed = {n for n, p in trainer.nets.fake.named_parameters() if not torch.equal(p, fake_before[n])}
    assert fake_changed and all(".default_others." in n for n in fake_changed)
    # the frozen real score: no gradient, no change; frozen generator parts hold no gradient either
    assert all(p.grad is None for p in trainer.real.parameters())
    assert all(torch.equal(p, q) for p, q in zip(trainer.real.parameters(), real_before))
    assert all(p.grad is None for n, p in gen.named_parameters() if not p.requires_grad)


def test_vsd_gradient_reaches_every_generator_trainable_and_nothing_else(trainer):
    from osediff.train import losses as L

    b = fixed_batch(trainer, seed=1)
    g = torch.Generator().manual_seed(8)
    z_hat, _ = trainer.nets.generator(b.x_L, b.c, g)
    t = L.sample_timesteps(2, 20, 980, g, "cpu")
    eps = torch.randn(z_hat.shape, generator=g)
    x0_real, x0_fake = L.vsd_x0(z_hat, t, eps, trainer.alphas, b.c, trainer.c_neg.expand(2, -1, -1),
                                trainer.real, trainer.nets.fake, 7.5)
    loss = L.vsd_loss(z_hat, x0_real, x0_fake)
    grads = torch.autograd.grad(loss, trainer.params_g, allow_unused=True)
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(gr.abs().sum() for gr in grads) > 0
    assert loss.grad_fn is not None and not x0_real.requires_grad and not x0_fake.requires_grad


def test_make_batch_is_seeded(trainer):
    b1, b2, b3 = fixed_batch(trainer, seed=3), fixed_batch(trainer, seed=3), fixed_batch(trainer, seed=4)
    assert torch.equal(b1.x_L, b2.x_L) and not torch.equal(b1.x_L, b3.x_L)
    assert torch.equal(b1.x_H, b3.x_H)  # the loader's first batch: same crops
    assert b1.x_L.shape == b1.x_H.shape == (2, 3, 32, 32)
    assert b1.x_L.min() >= -1 and b1.x_L.max() <= 1
    assert b1.c.shape == (2, 77, 32) and not b1.c.requires_grad and not b1.c.is_inference()
