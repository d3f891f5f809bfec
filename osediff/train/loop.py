"""The OSEDiff training loop on `accelerate` (spec §4): one process, several GPUs or several nodes, all through
`accelerate launch`; nothing distributed is written here.

`Trainer.step` is the recipe of one iteration (spec §4.5–§4.6); the rest is bookkeeping:

    make_batch   HQ crops -> LQ (Real-ESRGAN or face degradation, batched on the device) + prompt embeddings
    step         generator forward, L2 + LPIPS + VSD, generator update; fake-score ε-MSE, fake update
    fit          epochs -> steps until max_steps; logging, checkpoints, validation

Fixes of the reference's defects (spec §8.14–§8.18), all deliberate:
- the run stops at `max_steps` (the reference's loop never ends);
- the fake score is called through its (DDP-)wrapped forward, so its gradients are all-reduced across processes
  (the reference calls `.module.…` and each rank trains its own fake score);
- each trainable tensor is in its optimiser once (the reference lists the conv_in LoRA twice: double update);
- the negative prompt is encoded once, not B times per step; the unused VAE/text encoder of the regulariser
  are not built;
- checkpoints every N steps and at the end (the reference: at step % 500 == 1).

Precision (spec §4.5, §4.6 "Precision"), `--amp-placement`: by default ("reference") the authors' placement. Under
fp16 AMP the text encoder keeps fp32 weights and runs inside the generator's autocast region, the posterior noise
is drawn in the autocast dtype (diffusers' `latent_dist.sample()` inside the autocast-wrapped forward), the real
score runs in pure `--frozen-dtype` outside autocast with its CFG sum in that dtype, and the fake score in fp32
outside autocast. "frozen-dtype" is the earlier osediff placement: text encoder in `--frozen-dtype` outside
autocast, real score under autocast (fp32 norms, softmax and CFG), posterior noise in fp32; `--frozen-dtype fp32`
alone does not give the authors' placement. Without mixed precision both are the same fp32 computation. Logged
losses are unweighted (the reference logs LPIPS times its weight 2).

Randomness: every draw of a micro-step (degradation, posterior sample, timesteps, noise) comes from one
generator seeded by (seed, micro-step, process), and crops from (seed, epoch, position). Nothing depends on
RNG state carried between steps, so a resumed run repeats a straight run exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from osediff.core import schedule
from osediff.train import losses as L
from osediff.train.config import TrainConfig
from osediff.train.data import (
    EpochSampler,
    TrainImages,
    caption_for,
    derive_seed,
    gather_paths,
    list_source,
    read_captions,
    scan_images,
    to_tensor,
)
from osediff.train.models import Networks, build_networks, export_weights, frozen_dtype, trainable

log = logging.getLogger(__name__)

# Options that may change between a run and its resumption without changing what is trained.
_RESUMABLE_CHANGES = {"run.max_steps", "run.resume", "run.checkpoint_every", "run.keep_checkpoints", "run.log_every",
                      "run.val_dir", "run.val_every", "run.val_images", "run.val_scale", "run.tracker",
                      "data.workers"}


@dataclass
class Batch:
    """One micro-batch, ready for the networks."""

    x_H: Tensor  # (B, 3, H, W) HQ in [-1, 1]
    x_L: Tensor  # (B, 3, H, W) LQ (degraded, resized back) in [-1, 1]
    c: Tensor  # (B, 77, D) prompt embeddings, float32, no grad
    prompts: list[str]


@dataclass
class Losses:
    """The four logged losses (the reference's loss_l2, loss_lpips, loss_kl, loss_d), unweighted (the reference
    logs loss_lpips already multiplied by lambda_lpips)."""

    l2: float
    lpips: float
    vsd: float
    fake: float


class TrainState:
    """What accelerate's `save_state` does not know: the optimiser step, micro-step and data position."""

    def __init__(self) -> None:
        self.step = self.micro_steps = self.epoch = self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "micro_steps": self.micro_steps, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.step, self.micro_steps, self.epoch, self.position = (int(d[k]) for k in
                                                                    ("step", "micro_steps", "epoch", "position"))


def flat_config(cfg: TrainConfig) -> dict[str, object]:
    """{"section.field": value}, non-scalars as strings (tracker hyper-parameter tables accept scalars only)."""
    out: dict[str, object] = {}
    for section, values in dataclasses.asdict(cfg).items():
        for k, v in values.items():
            out[f"{section}.{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


def checkpoint_dirs(output: str | Path) -> list[Path]:
    """Completed checkpoint folders of a run, oldest first (half-written ones are hidden `.step_*.tmp`)."""
    root = Path(output) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


class Trainer:
    """Builds everything from a `TrainConfig` and trains. `lpips` / `tagger` replace the modules that would be
    loaded from files (tests and demos pass small random ones)."""

    def __init__(self, cfg: TrainConfig, *, lpips: torch.nn.Module | None = None,
                 tagger: torch.nn.Module | None = None):
        from accelerate import Accelerator
        from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed

        self.cfg = cfg
        run, d, mc = cfg.run, cfg.data, cfg.model
        self.out = Path(run.output)
        self.acc = acc = Accelerator(
            mixed_precision=run.mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=run.grad_accum,
                                                                    sync_with_dataloader=False),
            log_with=None if run.tracker == "none" else run.tracker,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")))
        if acc.device.type == "cpu" and run.mixed_precision == "fp16":
            raise ValueError("fp16 mixed precision needs a GPU; use --mixed-precision no (or bf16) on a CPU")
        if acc.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = run.tf32
        self.state = TrainState()
        self.dtype = frozen_dtype(mc.frozen_dtype, run.mixed_precision)

        # data (spec §4.2, §4.3, §4.7), checked before anything heavy is built
        self.degradation = self._degradation()
        self.captions = read_captions(d.captions) if d.prompts == "captions" else None
        paths = scan_images(gather_paths(d.data, d.repeats), 0 if d.face else d.crop)
        self.dataset = TrainImages(paths, d.crop, d.face)
        self.global_batch = run.batch_size * acc.num_processes
        self.sampler = EpochSampler(len(self.dataset), self.global_batch, run.seed)
        if self.captions is not None:
            missing = sum(caption_for(self.captions, p) is None for p in set(paths))
            if missing:
                log.warning("%d training images have no caption in %s; they get an empty prompt", missing,
                            d.captions)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=torch.utils.data.BatchSampler(self.sampler, run.batch_size, drop_last=False),
            num_workers=d.workers, pin_memory=acc.device.type == "cuda")
        self.tagger = self._tagger(tagger)  # prompts (spec §4.4)
        self.lpips = self._lpips(lpips)  # LPIPS-VGG v0.1 (spec §4.6)

        # networks (spec §2): LoRA init drawn from the seeded global RNG
        set_seed(run.seed)
        nets: Networks = build_networks(mc.base, mc.rank, mc.fake_lora, self.dtype, mc.gradient_checkpointing,
                                        run.amp_placement)
        self.nets, self.model = nets, nets.generator.model
        self.real = nets.real.to(acc.device)
        self.alphas = schedule.alphas_cumprod().to(acc.device)

        # optimisers (spec §4.6): each trainable tensor once (the reference lists the conv_in LoRA twice, §8.17)
        self.params_g, self.params_f = trainable(nets.generator), trainable(nets.fake)
        opt_g, opt_f = self._optimizer(self.params_g), self._optimizer(self.params_f)
        self.generator, self.fake, self.opt_g, self.opt_f, self.loader = acc.prepare(
            nets.generator, nets.fake, opt_g, opt_f, loader)
        acc.register_for_checkpointing(self.state)
        acc.register_save_state_pre_hook(self._save_trainable)
        acc.register_load_state_pre_hook(self._load_trainable)

        # the negative prompt, encoded once (spec §8.18)
        self.c_neg = self.encode_prompts([d.neg_prompt])  # (1, 77, D)
        self.history: list[dict[str, float]] = []

    # --- the recipe ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def make_batch(self, hq: Tensor, paths: list[str], g: torch.Generator) -> Batch:
        """HQ crops (B, 3, H, W) in [0, 1] on the device -> a Batch: LQ by the degradation (spec §4.3), prompts
        from the HQ (spec §4.4: RAM tags joined by ', ', no suffix), embedded by the frozen text encoder."""
        from osediff.degradation.face import degrade_face
        from osediff.degradation.realesrgan import degrade

        lq = degrade_face(hq, self.degradation, g) if self.cfg.data.face else degrade(hq, self.degradation, g)
        prompts = self.prompts(hq, paths)
        c = self.encode_prompts(prompts)
        return Batch(x_H=hq * 2 - 1, x_L=lq.clamp(0, 1) * 2 - 1, c=c, prompts=prompts)

    def step(self, batch: Batch, g: torch.Generator) -> Losses:
        """One OSEDiff iteration (spec §4.5–§4.6), in the reference's order."""
        lc, acc = self.cfg.loss, self.acc
        b, dev = batch.x_H.shape[0], batch.x_H.device
        c, c_neg = batch.c, self.c_neg.expand(b, -1, -1)
        with acc.accumulate(self.generator, self.fake):
            # 1. generator: ẑ_H = G_θ(x_L) from a posterior sample at t = 999, x̂_H = D(ẑ_H)
            z_hat, x_hat = self.generator(batch.x_L, c, g)

            with acc.autocast():
                # 2. data losses in pixel space, [-1, 1]
                l2 = L.l2_loss(x_hat, batch.x_H)
                # (.float(): the reference's LPIPS is an accelerate-prepared module, its output converted to fp32)
                lpips = self.lpips(x_hat, batch.x_H).float().mean() if self.lpips is not None else l2.new_zeros(())
                # 3. VSD: real score with CFG on the negative prompt, fake score without; DMD normalisation
                t = L.sample_timesteps(b, lc.vsd_t_min, lc.vsd_t_max, g, dev)
                eps = torch.randn(z_hat.shape, generator=g, device=dev)
                x0_real, x0_fake = L.vsd_x0(z_hat, t, eps, self.alphas, c, c_neg, self.real, self.fake, lc.cfg_vsd,
                                            self.cfg_dtype)
                vsd = L.vsd_loss(z_hat, x0_real, x0_fake)

            # 4. generator update: L2 + 2·LPIPS + 1·VSD, clip 1.0, AdamW
            self._update(lc.lambda_l2 * l2 + lc.lambda_lpips * lpips + lc.lambda_vsd * vsd, self.opt_g,
                         self.params_g)

            # 5. fake score: ε-MSE on the detached ẑ_H, t ~ U{0..999}, fp32, clip 1.0, its own AdamW
            t = L.sample_timesteps(b, 0, 1000, g, dev)
            eps = torch.randn(z_hat.shape, generator=g, device=dev)
            fake = L.diffusion_loss(self.fake(L.noised(z_hat.detach(), t, eps, self.alphas), t, c), eps)
            self._update(lc.lambda_fake * fake, self.opt_f, self.params_f)
        return Losses(l2.item(), lpips.item(), vsd.item(), fake.item())

    def _update(self, loss: Tensor, optimizer, params: list[torch.nn.Parameter]) -> None:
        self.acc.backward(loss)
        if self.acc.sync_gradients:
            # Unscale this optimiser only: accelerate's clip_grad_norm_ unscales every prepared optimiser, which
            # under fp16 with grad_accum > 1 would unscale the fake score's half-accumulated gradients twice.
            self.acc.unscale_gradients(optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.max_grad_norm)
        optimizer.step()  # accelerate skips the step and the zeroing between accumulation micro-steps
        optimizer.zero_grad(set_to_none=True)

    # --- the loop --------------------------------------------------------------------------------------------
    def fit(self) -> list[dict[str, float]]:
        """Train until `max_steps` optimiser steps; returns the per-step losses of this process."""
        from tqdm.auto import tqdm

        run, s, acc = self.cfg.run, self.state, self.acc
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            self._write_config()
        if run.tracker != "none":
            acc.init_trackers("osediff", config=flat_config(self.cfg))
        log.info("training %d trainable generator + %d fake-score parameters on %d process(es), %d images; "
                 "global batch %d", sum(p.numel() for p in self.params_g), sum(p.numel() for p in self.params_f),
                 acc.num_processes, len(self.dataset), self.global_batch * run.grad_accum)
        bar = tqdm(total=run.max_steps, initial=s.step, desc="train", disable=not acc.is_local_main_process)
        while s.step < run.max_steps:
            self.sampler.resume(s.epoch, s.position)
            self.loader.set_epoch(s.epoch)
            for raw in self.loader:
                g = torch.Generator(acc.device).manual_seed(
                    derive_seed(run.seed, "step", s.micro_steps, acc.process_index))
                losses = self.step(self.make_batch(raw["hq"], raw["path"], g), g)
                s.micro_steps += 1
                s.position += self.global_batch
                if s.position >= self.sampler.epoch_length:
                    s.epoch, s.position = s.epoch + 1, 0
                if s.micro_steps % run.grad_accum:
                    continue
                s.step += 1
                self._after_step(losses, bar)
                if s.step >= run.max_steps:
                    break
        bar.close()
        acc.end_training()
        return self.history

    def _after_step(self, losses: Losses, bar) -> None:
        run, step = self.cfg.run, self.state.step
        values = dataclasses.asdict(losses)
        self.history.append({"step": step, **values})
        bar.update(1)
        bar.set_postfix(l2=f"{losses.l2:.4f}", lpips=f"{losses.lpips:.4f}", vsd=f"{losses.vsd:.4f}",
                        fake=f"{losses.fake:.4f}")
        if step % run.log_every == 0 or step == run.max_steps:
            self.acc.log({f"loss/{k}": v for k, v in values.items()}, step=step)
        if step % run.checkpoint_every == 0 or step == run.max_steps:
            self.save_checkpoint()
        if run.val_dir and (step % run.val_every == 0 or step == run.max_steps):
            self.validate()

    # --- pieces ----------------------------------------------------------------------------------------------
    @property
    def cfg_dtype(self) -> torch.dtype:
        """dtype of the real score's CFG sum: its own with the reference placement, else float32."""
        return self.dtype if self.cfg.run.amp_placement == "reference" else torch.float32

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """(B, 77, D) float32 embeddings, without gradient. Reference placement: under the generator's autocast,
        as the reference encodes inside its autocast-wrapped forward (fp32 weights, autocast matmuls)."""
        with self.acc.autocast() if self.cfg.run.amp_placement == "reference" else nullcontext():
            return self.model.encode_text(prompts, cache=False).float()

    def prompts(self, hq: Tensor, paths: list[str]) -> list[str]:
        """One training prompt per HQ crop (spec §4.4)."""
        mode = self.cfg.data.prompts
        if mode == "ram":
            return self.tagger(hq)
        if mode == "captions":
            return [caption_for(self.captions, p) or "" for p in paths]
        return [""] * hq.shape[0]

    def _degradation(self):
        d = self.cfg.data
        if d.face:
            from osediff.degradation.face import FaceDegradationConfig

            cfg = FaceDegradationConfig.from_yaml(d.degradation) if d.degradation else FaceDegradationConfig()
            if d.crop <= cfg.blur_kernel_size // 2:
                raise ValueError(f"--crop {d.crop} is too small for the face degradation's "
                                 f"{cfg.blur_kernel_size}-tap blur")
            return cfg
        from osediff.degradation.realesrgan import DegradationConfig, check_input

        cfg = DegradationConfig.from_yaml(d.degradation) if d.degradation else DegradationConfig()
        cfg = dataclasses.replace(cfg, jpeg_tables=d.jpeg_tables)

        def fits(crop: int) -> bool:
            try:
                check_input(torch.zeros(1, 3, crop, crop), cfg)
                return True
            except ValueError:
                return False

        if not fits(d.crop):
            smallest = next(c for c in range(d.crop, 100 * d.crop, 8) if fits(c))
            raise ValueError(f"--crop {d.crop} is too small for the degradation's {cfg.kernel_info.blur_kernel_size}"
                             f"-tap kernels and ×{cfg.scale} downscaling: use --crop {smallest} or more, or a "
                             "--degradation file with smaller kernels")
        return cfg

    def _lpips(self, given: torch.nn.Module | None) -> torch.nn.Module | None:
        lc = self.cfg.loss
        if lc.lambda_lpips == 0:
            return None
        if given is None:
            from osediff.evaluation.lpips import LPIPS

            with self.acc.main_process_first():  # one download into the shared cache, not one per process
                given = LPIPS.from_files(lc.lpips_vgg, lc.lpips_lin)
        return given.to(self.acc.device).requires_grad_(False).eval()

    def _tagger(self, given: torch.nn.Module | None) -> torch.nn.Module | None:
        d = self.cfg.data
        if d.prompts != "ram":
            return None
        if given is None:
            if not d.ram:
                raise ValueError("--prompts ram needs the RAM weights: --ram ram_swin_large_14m.pth")
            from osediff.dape import RAMTagger

            return RAMTagger.from_files(d.ram, None, device=self.acc.device, dtype=self.dtype)
        return given.to(self.acc.device)

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if o.adam_8bit:
            try:
                import bitsandbytes as bnb
            except ImportError as e:
                raise ImportError("--adam-8bit needs bitsandbytes: pip install bitsandbytes") from e
            cls = bnb.optim.AdamW8bit
        else:
            cls = torch.optim.AdamW
        return cls(params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay, eps=o.adam_eps)

    # --- checkpoints -----------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """checkpoints/step_NNNNNNN/ = model_N.pkl (authors' format, spec §3.1) + model_N.safetensors (ours) +
        state/ (accelerate: trainable tensors, optimisers, scaler, RNGs, step and data position). Written in a
        hidden temporary folder and renamed, so a checkpoint folder is always complete; the last K are kept."""
        from osediff.core.checkpoint import save_authors_pkl, save_safetensors

        acc, step = self.acc, self.state.step
        root = self.out / "checkpoints"
        final, tmp = root / f"step_{step:07d}", root / f".step_{step:07d}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        self._check_in_sync()
        acc.save_state(str(tmp / "state"))
        if acc.is_main_process:
            meta = {"step": step, "config": json.loads(self._config_json())}
            w = export_weights(self.nets.generator, self.nets.unet_targets, self.nets.vae_targets, self.nets.rank)
            save_authors_pkl(w, tmp / f"model_{step}.pkl")
            save_safetensors(w, tmp / f"model_{step}.safetensors", extra=meta)
            if final.exists():  # the same step saved again (a resumed run that was already finished)
                shutil.rmtree(final)
            tmp.rename(final)
            for old in checkpoint_dirs(self.out)[:-self.cfg.run.keep_checkpoints]:
                shutil.rmtree(old)
            log.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    def resume(self, where: str) -> Path | None:
        """Load a checkpoint folder (or the latest one for "latest") and continue from its step."""
        if where == "latest":
            found = checkpoint_dirs(self.out)
            if not found:
                log.info("no checkpoint in %s: starting from scratch", self.out / "checkpoints")
                return None
            path = found[-1]
        else:
            path = Path(where)
            if not (path / "state").is_dir():
                raise FileNotFoundError(f"{path} is not an osediff training checkpoint (no state/ folder)")
        self._compare_config()
        self.acc.load_state(str(path / "state"))
        log.info("resumed from %s at step %d", path, self.state.step)
        return path

    def _save_trainable(self, models, weights, output_dir) -> None:
        """accelerate save hook: only the trainable tensors of each model (LoRA + conv_in, ~17 MB at full size),
        not the frozen SD weights (~8 GB), which a resume rebuilds from the base model."""
        from safetensors.torch import save_file

        if self.acc.is_main_process:
            for i, model in enumerate(models):
                state = {n: p.detach().cpu().contiguous()
                         for n, p in self.acc.unwrap_model(model).named_parameters() if p.requires_grad}
                save_file(state, str(Path(output_dir) / f"trainable_{i}.safetensors"))
        weights.clear()

    def _load_trainable(self, models, input_dir) -> None:
        from safetensors.torch import load_file

        for i, model in enumerate(models):
            state = load_file(str(Path(input_dir) / f"trainable_{i}.safetensors"))
            params = {n: p for n, p in self.acc.unwrap_model(model).named_parameters() if p.requires_grad}
            if set(state) != set(params):
                raise ValueError(f"checkpoint {input_dir} does not match this model: "
                                 f"{len(set(params) - set(state))} tensors missing, "
                                 f"{len(set(state) - set(params))} unexpected (different --rank or --fake-lora?)")
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(state[n])
        models.clear()

    def _check_in_sync(self) -> None:
        """Log an error if a trained model differs between processes (it must not: gradients are all-reduced)."""
        if self.acc.num_processes == 1:
            return
        for name, params in (("generator", self.params_g), ("fake score", self.params_f)):
            checksum = torch.stack([p.detach().double().sum() for p in params]).sum().view(1)
            gathered = self.acc.gather(checksum.to(self.acc.device))
            if not torch.all(gathered == gathered[0]):
                log.error("the %s differs between processes (checksums %s)", name, gathered.tolist())

    def _config_json(self) -> str:
        from osediff.config import to_json

        return to_json(self.cfg)

    def _write_config(self) -> None:
        (self.out / "config.json").write_text(self._config_json() + "\n")

    def _compare_config(self) -> None:
        saved = self.out / "config.json"
        if not saved.is_file():
            return
        old = {f"{s}.{k}": v for s, vs in json.loads(saved.read_text()).items() for k, v in vs.items()}
        new = {f"{s}.{k}": v for s, vs in json.loads(self._config_json()).items() for k, v in vs.items()}
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in _RESUMABLE_CHANGES)
        if changed:
            log.warning("resuming with a different configuration: %s",
                        ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed))

    # --- validation ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Super-resolve the first `val_images` LR images of `val_dir` with the current generator through the
        same per-file path as `osediff sr` (so the PNGs are what inference would write), to val/step_NNNNNNN/
        and to the tracker."""
        from osediff.core.pipeline import OSEDiffPipeline, SROptions
        from osediff.files.images import read_image, write_image

        acc, run, step = self.acc, self.cfg.run, self.state.step
        if acc.is_main_process:
            pipe = OSEDiffPipeline(self.model, self.tagger, SROptions(scale=run.val_scale))
            folder = self.out / "val" / f"step_{step:07d}"
            for path in list_source(run.val_dir)[:run.val_images]:
                out, _ = pipe.run_picture(read_image(path))
                write_image(folder / f"{Path(path).stem}.png", out)
                y = to_tensor(out.rgb)[None]  # (1, 3, s·h, s·w) in [0, 1]
                rgb = (y[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                for tracker in acc.trackers:
                    if tracker.name == "tensorboard":
                        tracker.log_images({f"val/{Path(path).stem}": y.cpu()}, step=step)
                    elif tracker.name == "wandb":
                        tracker.log_images({f"val/{Path(path).stem}": [rgb]}, step=step)
            log.info("validation images in %s", folder)
        acc.wait_for_everyone()


def train(cfg: TrainConfig, *, lpips: torch.nn.Module | None = None,
          tagger: torch.nn.Module | None = None) -> list[dict[str, float]]:
    """`osediff train`: build, resume if asked, train to `max_steps`. Returns this process's per-step losses."""
    trainer = Trainer(cfg, lpips=lpips, tagger=tagger)
    if cfg.run.resume:
        trainer.resume(cfg.run.resume)
    return trainer.fit()
