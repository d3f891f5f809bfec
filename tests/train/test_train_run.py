"""Whole runs on a tiny random SD (CPU, 32² crops): kill and resume repeats a straight run exactly, checkpoints
load into the inference pipeline, bad files do not stop a run, and `osediff train` works end to end."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train_step import (  # noqa: F401 (one_thread: an autouse fixture)
    image_folder,
    new_trainer,
    one_thread,
    random_lpips,
    small_kernel_yaml,
    tiny_config,
)

from osediff.train.loop import checkpoint_dirs


def final_state(run_dir):
    """The trainable tensors (generator, fake score) and the exported weights of a run's last checkpoint."""
    last = checkpoint_dirs(run_dir)[-1]
    step = int(last.name.split("_")[1])
    return {**{f"g.{k}": v for k, v in load_file(last / "state" / "trainable_0.safetensors").items()},
            **{f"f.{k}": v for k, v in load_file(last / "state" / "trainable_1.safetensors").items()},
            **{f"w.{k}": v for k, v in load_file(last / f"model_{step}.safetensors").items()}}


def test_kill_and_resume_repeats_a_straight_run(tiny_sd, tmp_path):
    # 3 images, batch 1, 2 micro-steps per step: epochs end mid-step, and the resume point (step 3 = micro-step 6)
    # starts a new epoch's second pass.
    data = image_folder(tmp_path / "data", 3)
    kw = dict(run_kw={"batch_size": 1, "grad_accum": 2, "checkpoint_every": 3, "max_steps": 6},
              optim_kw={"lr": 1e-3})

    straight = new_trainer(tiny_config(tiny_sd, data, tmp_path / "a", **kw), lpips=random_lpips()).fit()

    kw_b = dict(kw, run_kw={**kw["run_kw"], "max_steps": 3})
    first = new_trainer(tiny_config(tiny_sd, data, tmp_path / "b", **kw_b), lpips=random_lpips()).fit()
    kw_c = dict(kw, run_kw={**kw["run_kw"], "resume": "latest"})
    resumed = new_trainer(tiny_config(tiny_sd, data, tmp_path / "b", **kw_c), lpips=random_lpips())
    resumed.resume("latest")
    assert resumed.state.step == 3
    second = resumed.fit()

    assert [h["step"] for h in straight] == [1, 2, 3, 4, 5, 6]
    assert first + second == straight  # bitwise equal losses
    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if ".lora_B." in k)
    # the optimiser moments too
    oa = torch.load(checkpoint_dirs(tmp_path / "a")[-1] / "state" / "optimizer.bin", weights_only=True)
    ob = torch.load(checkpoint_dirs(tmp_path / "b")[-1] / "state" / "optimizer.bin", weights_only=True)
    assert all(torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"]) for i in oa["state"])
    # checkpoints at 3 and 6, both kept (keep_checkpoints 3), no half-written folder left
    assert [p.name for p in checkpoint_dirs(tmp_path / "a")] == ["step_0000003", "step_0000006"]
    assert not list((tmp_path / "a" / "checkpoints").glob(".*"))


@pytest.fixture(scope="module")
def trained(tiny_sd, tmp_path_factory):
    """A 2-step run with a worker process, per-step checkpoints, keep 1, validation, tensorboard; the Trainer
    after fit()."""
    root = tmp_path_factory.mktemp("trained")
    val = root / "val_lr"
    val.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(val / "v.png")
    cfg = tiny_config(tiny_sd, image_folder(root / "data", 2), root / "run", optim_kw={"lr": 1e-2},
                      data_kw={"workers": 1}, run_kw={"checkpoint_every": 1, "keep_checkpoints": 1, "val_dir": str(val), "val_every": 2,
                              "val_images": 1, "tracker": "tensorboard"})
    tr = new_trainer(cfg, lpips=random_lpips())
    tr.fit()
    return tr


def test_run_folder_layout(trained):
    out = trained.out
    assert [p.name for p in checkpoint_dirs(out)] == ["step_0000002"]  # keep_checkpoints=1 pruned step 1
    ck = checkpoint_dirs(out)[0]
    assert {p.name for p in ck.iterdir()} == {"model_2.pkl", "model_2.safetensors", "state"}
    assert json.loads((out / "config.json").read_text())["run"]["max_steps"] == 2
    assert (out / "val" / "step_0000002" / "v.png").is_file()
    assert Image.open(out / "val" / "step_0000002" / "v.png").size == (40, 48)  # ×4 of the 10×12 LR image
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_checkpoint_loads_into_the_inference_pipeline(trained, tiny_sd):
    from osediff.core.checkpoint import load_weights
    from osediff.core.model import OSEDiffModel
    from osediff.core.pipeline import OSEDiffPipeline

    ck = checkpoint_dirs(trained.out)[0]
    raw = torch.load(ck / "model_2.pkl", map_location="cpu", weights_only=True)  # the authors' format, §3.1
    assert set(raw) == {"vae_lora_encoder_modules", "unet_lora_encoder_modules", "unet_lora_decoder_modules",
                        "unet_lora_others_modules", "rank_unet", "rank_vae", "state_dict_unet", "state_dict_vae"}
    assert all("lora" in k or "conv_in" in k for k in raw["state_dict_unet"])
    assert "conv_in.base_layer.weight" in raw["state_dict_unet"]
    assert all(v.dtype == torch.float32 for v in raw["state_dict_unet"].values())
    w_st = load_weights(ck / "model_2.safetensors")
    assert w_st.metadata["step"] == 2 and w_st.metadata["config"]["model"]["rank"] == 4
    assert all(torch.equal(v, raw["state_dict_unet"][k]) for k, v in w_st.unet_state.items())

    x = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    in_memory = OSEDiffPipeline(trained.model)(x)
    unmerged = OSEDiffPipeline(OSEDiffModel.from_pretrained(str(tiny_sd), str(ck / "model_2.pkl"), merge=False))(x)
    merged = OSEDiffPipeline(OSEDiffModel.from_pretrained(str(tiny_sd), str(ck / "model_2.pkl")))(x)
    assert torch.equal(unmerged, in_memory)
    torch.testing.assert_close(merged, in_memory, atol=2e-5, rtol=0)
    plain_sd = OSEDiffPipeline(OSEDiffModel.from_pretrained(str(tiny_sd), None))(x)
    assert (plain_sd - in_memory).abs().max() > 1e-3  # training changed the model


def test_bad_files_do_not_stop_a_run(tiny_sd, tmp_path, caplog):
    d = tmp_path / "data"
    image_folder(d, 2)
    Image.fromarray(np.full((20, 90, 3), 128, np.uint8)).save(d / "tiny.png")  # smaller than the crop
    Image.fromarray(np.full((40, 40), 90, np.uint8), "L").save(d / "gray.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "trunc.jpg")
    whole = (d / "trunc.jpg").read_bytes()
    (d / "trunc.jpg").write_bytes(whole[:len(whole) // 2])  # the header reads, the pixels do not
    (tmp_path / "captions.txt").write_text("img0\ta red thing\nimg1.png\ta blue thing\n")
    cfg = tiny_config(tiny_sd, str(d), tmp_path / "run",
                      data_kw={"prompts": "captions", "captions": str(tmp_path / "captions.txt")},
                      run_kw={"max_steps": 3, "batch_size": 2})
    with caplog.at_level(logging.WARNING):
        history = new_trainer(cfg, lpips=random_lpips()).fit()
    assert len(history) == 3 and all(np.isfinite(h["l2"]) for h in history)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "skipping 2 of 6 training images" in messages
    assert "2 training images have no caption" in messages  # gray.png and trunc.jpg
    assert "skipping training image" in messages and "trunc.jpg" in messages  # found when decoded
    assert checkpoint_dirs(tmp_path / "run")


def test_cli_end_to_end_and_dry_run(tiny_sd, tmp_path, capsys):
    from osediff.cli import main

    data = image_folder(tmp_path / "data", 2)
    args = ["train", "--data", data, "--base", str(tiny_sd), "-o", str(tmp_path / "run"), "--crop", "32",
            "--degradation", small_kernel_yaml(tmp_path), "--prompts", "none", "--lambda-lpips", "0",
            "--mixed-precision", "no", "--max-steps", "2", "--batch-size", "1", "--workers", "0",
            "--checkpoint-every", "1", "--tracker", "none", "--fake-lora", "all"]
    assert main(args + ["--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["run"]["max_steps"] == 2 and printed["model"]["fake_lora"] == "all"
    assert printed["data"]["neg_prompt"].startswith("painting, oil painting")
    assert printed["optim"] == {"lr": 5e-5, "adam_beta1": 0.9, "adam_beta2": 0.999, "weight_decay": 0.01,
                                "adam_eps": 1e-8, "max_grad_norm": 1.0, "adam_8bit": False}
    assert not (tmp_path / "run").exists()

    assert main(args) == 0
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step_0000001", "step_0000002"]
    assert main(args + ["--resume", "latest", "--max-steps", "3"]) == 0  # continue a finished run
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")][-1] == "step_0000003"
    assert main(["train", "--data", data, "-o", str(tmp_path / "x"), "--crop", "30", "--dry-run"]) == 2


def test_face_mode_step(tiny_sd, tmp_path):
    from osediff.train.config import FACE_NEG_PROMPT

    data = image_folder(tmp_path / "faces", 2, size=(40, 28))  # not square, smaller than the crop: resized
    tr = new_trainer(tiny_config(tiny_sd, data, tmp_path / "run", data_kw={"face": True, "degradation": None}),
                     lpips=random_lpips())
    assert tr.cfg.data.neg_prompt == FACE_NEG_PROMPT and len(tr.dataset) == 2
    raw = next(iter(tr.loader))
    batch = tr.make_batch(raw["hq"], raw["path"], torch.Generator().manual_seed(0))
    assert batch.x_L.shape == (2, 3, 32, 32) and not torch.equal(batch.x_L, batch.x_H)
    losses = tr.step(batch, torch.Generator().manual_seed(0))
    assert np.isfinite([losses.l2, losses.lpips, losses.vsd, losses.fake]).all()


def test_two_processes_keep_both_models_in_sync(tiny_sd, tmp_path):
    """torchrun, 2 CPU processes (gloo): the generator and the fake score stay identical across processes (the
    reference's fake score does not, spec §8.16); the checkpoint-time check would log an error otherwise."""
    import os
    import subprocess
    import sys

    data = image_folder(tmp_path / "data", 5)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "osediff", "train", "--data", data, "--base", str(tiny_sd), "-o", str(tmp_path / "run"),
           "--crop", "32", "--degradation", small_kernel_yaml(tmp_path), "--prompts", "none", "--lambda-lpips", "0",
           "--mixed-precision", "no", "--max-steps", "3", "--batch-size", "1", "--workers", "0",
           "--checkpoint-every", "2", "--tracker", "none"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "on 2 process(es)" in log and "differs between processes" not in log
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step_0000002", "step_0000003"]
