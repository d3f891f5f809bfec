"""`osediff sr` on what real collections hold: hostile files between good ones, a lost device, metadata and
grayscale carried (or stripped), multi-frame files, and sizes other than ×4 (also in the batch path)."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from osediff.cli import main

MAKE, MODEL, DATETIME, ORIENTATION = 0x010F, 0x0110, 0x0132, 0x0112


@pytest.fixture
def args(sr_args):
    return sr_args


def _rgb(w, h, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _bomb(path, w=30000, h=30000):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "files"))
    from test_imageio import bomb_png

    bomb_png(path, w, h)


def test_hostile_files_lose_only_themselves(tmp_path, args, caplog, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for name in ["a.png", "c.png", "e.png", "g.png"]:
        Image.fromarray(_rgb(12, 10, ord(name[0]))).save(src / name)
    _bomb(src / "b_bomb.png")  # header: 30000×30000, ~100 bytes
    (src / "d_empty.jpg").write_bytes(b"")
    Image.fromarray(_rgb(13, 11, 5)).save(src / "f_odd.png")
    frames = [Image.fromarray(_rgb(12, 10, s)) for s in range(3)]
    frames[0].save(src / "h_anim.gif", save_all=True, append_images=frames[1:], duration=40, loop=0)
    Image.fromarray(_rgb(12, 10, 6)).save(src / "i_locked.png")

    import osediff.files.images as images

    real_from_pil, real_read = images.from_pil, images.read_image

    def odd_decoder(im, meta=None):  # something no reader expects, from inside the decoder stage
        if im.size == (13, 11):
            raise ZeroDivisionError("decoder bug")
        return real_from_pil(im, meta)

    def locked(path, *a, **k):  # raised outside the decoder: not even an ImageReadError
        if "i_locked" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path, *a, **k)

    monkeypatch.setattr(images, "from_pil", odd_decoder)
    monkeypatch.setattr(images, "read_image", locked)
    out = tmp_path / "out"
    assert main(["sr", str(src), "-o", str(out), *args]) == 1
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "c.png", "e.png", "g.png", "h_anim.png"]
    for bad in ["b_bomb.png", "d_empty.jpg", "f_odd.png", "i_locked.png"]:
        assert bad in caplog.text
    assert "30000x30000 = 900 megapixels" in caplog.text and "--max-input-megapixels" in caplog.text
    assert "h_anim.gif: 3 frames; only the first is processed" in caplog.text
    assert "4 of 9 images failed" in caplog.text


def test_a_lost_device_ends_the_run_and_skip_existing_resumes(tmp_path, args, caplog, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        Image.fromarray(_rgb(12 + i, 10, i)).save(src / f"s{i}.png")
    from osediff.core.pipeline import OSEDiffPipeline

    original = OSEDiffPipeline.run_pictures

    def broken(self, pics, prompt=None):
        w = pics[0].size[0]
        if w == 13:  # out of memory: this image's failure, the run goes on
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if w == 14:  # the device is gone: every later image would fail too
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return original(self, pics, prompt)

    monkeypatch.setattr(OSEDiffPipeline, "run_pictures", broken)
    out = tmp_path / "out"
    assert main(["sr", str(src), "-o", str(out), *args]) == 3
    assert sorted(p.name for p in out.glob("*.png")) == ["s0.png"]  # s3 never started
    assert "s1.png: out of memory" in caplog.text
    assert "illegal memory access" in caplog.text and "--skip-existing" in caplog.text
    monkeypatch.undo()
    assert main(["sr", str(src), "-o", str(out), *args, "--skip-existing"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["s0.png", "s1.png", "s2.png", "s3.png"]


def test_metadata_and_grayscale_are_carried_or_stripped(tmp_path, args):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[MAKE], exif[MODEL], exif[DATETIME], exif[ORIENTATION] = "Nikon", "Z8", "2025:01:02 03:04:05", 8
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_rgb(20, 12)).save(src / "photo.jpg", icc_profile=icc, exif=exif.tobytes(), dpi=(240, 240))
    Image.fromarray(_rgb(16, 12, 1)[..., 0], "L").save(src / "gray.png")
    Image.fromarray(np.dstack([_rgb(16, 12, 2)[..., :1], _rgb(16, 12, 3)[..., :1]]), "LA").save(src / "la.png")
    out = tmp_path / "out"
    assert main(["sr", str(src), "-o", str(out), *args, "--ext", "auto"]) == 0
    with Image.open(out / "photo.jpg") as im:
        e = im.getexif()
        assert im.size == (48, 80) and im.info["icc_profile"] == icc  # orientation 8: shown 12×20
        assert (e[MAKE], e[MODEL], e[DATETIME], e.get(ORIENTATION, 1)) == ("Nikon", "Z8", "2025:01:02 03:04:05", 1)
        assert im.info["dpi"] == (240, 240)
    assert Image.open(out / "gray.png").mode == "L" and Image.open(out / "la.png").mode == "LA"
    bare = tmp_path / "bare"
    assert main(["sr", str(src), "-o", str(bare), *args, "--ext", "auto", "--strip-metadata", "--keep-rgb"]) == 0
    with Image.open(bare / "photo.jpg") as im:
        assert "icc_profile" not in im.info and not len(im.getexif()) and im.size == (48, 80)
    assert Image.open(bare / "gray.png").mode == "RGB" and Image.open(bare / "la.png").mode == "RGBA"


@pytest.mark.parametrize("flags,size", [(["--scale", "2.5"], (40, 25)), (["--scale", "1.5"], (24, 15)),
                                        (["--long-side", "50"], (50, 31)), (["--size", "30x40"], (30, 40))])
def test_any_scale_from_the_command_line_and_in_batches(tmp_path, args, flags, size):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(_rgb(16, 10, i)).save(src / f"s{i}.png")
    one, three = tmp_path / "one", tmp_path / "three"
    assert main(["sr", str(src), "-o", str(one), *args, *flags]) == 0
    assert main(["sr", str(src), "-o", str(three), *args, *flags, "--batch-size", "3"]) == 0
    for i in range(3):
        a, b = Image.open(one / f"s{i}.png"), Image.open(three / f"s{i}.png")
        assert a.size == b.size == size
        d = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
        assert d.max() <= 2 and (d > 0).mean() < 0.01  # batched = one by one, up to float rounding


def test_bad_size_flags_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit, match="WxH"):
        main(["sr", str(tmp_path), "-o", str(tmp_path / "o"), "--size", "4k", "--dry-run"])
    Image.fromarray(_rgb(8, 8)).save(tmp_path / "a.png")
    assert main(["sr", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--scale", "2.5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert '"scale": 2.5' in out and '"max_input_megapixels": 150.0' in out and '"max_guard_megapixels": 4.0' in out


def test_the_input_cap_defaults_agree():
    from osediff.core.options import DEFAULT_MAX_INPUT_MEGAPIXELS, FileOptions
    from osediff.files import images

    assert FileOptions().max_input_megapixels == DEFAULT_MAX_INPUT_MEGAPIXELS == images.DEFAULT_MAX_INPUT_MEGAPIXELS
