"""Training data (spec §4.2, §4.7): sources, the bad-file scan, seeded crops and the resumable epoch order."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from osediff.train.data import (
    EpochSampler,
    TrainImages,
    caption_for,
    gather_paths,
    list_source,
    read_captions,
    scan_images,
)


def write_rgb(path, w, h, seed=0, mode="RGB"):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(a, "RGB")
    (im.convert(mode) if mode != "RGB" else im).save(path)
    return str(path)


def bad_folder(tmp_path):
    """Good RGB, grayscale, RGBA and 16-bit images; one too small, one not an image, one truncated."""
    import png

    d = tmp_path / "imgs"
    d.mkdir()
    write_rgb(d / "a_rgb.png", 80, 72, 1)
    write_rgb(d / "b_gray.png", 64, 96, 2, mode="L")
    write_rgb(d / "c_rgba.png", 70, 70, 3, mode="RGBA")
    g16 = np.random.default_rng(4).integers(0, 65536, (66, 68 * 3), dtype=np.uint16)
    with open(d / "d_16bit.png", "wb") as f:
        png.Writer(68, 66, greyscale=False, bitdepth=16).write(f, g16)
    write_rgb(d / "e_tiny.png", 40, 200, 5)
    (d / "f_corrupt.png").write_bytes(b"this is not an image" * 20)
    write_rgb(d / "g_truncated.jpg", 90, 90, 6)
    data = (d / "g_truncated.jpg").read_bytes()
    (d / "g_truncated.jpg").write_bytes(data[: len(data) // 3])
    (d / "notes.txt").write_text("not listed: wrong extension")
    return d


def test_sources_folders_lists_and_repeats(tmp_path):
    d = tmp_path / "f"
    (d / "sub").mkdir(parents=True)
    a, b = write_rgb(d / "a.png", 8, 8), write_rgb(d / "sub" / "b.jpg", 8, 8)
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\n\nf/a.png\n{b}\n")
    assert list_source(d) == [a, b]
    assert list_source(lst) == [str(tmp_path / "f" / "a.png"), b]  # relative to the list's folder
    assert gather_paths([str(d), str(lst)], [2, 1]) == [a, b, a, b, str(tmp_path / "f" / "a.png"), b]
    with pytest.raises(FileNotFoundError):
        list_source(tmp_path / "missing")


def test_scan_skips_small_and_unreadable_with_one_warning(tmp_path, caplog):
    d = bad_folder(tmp_path)
    paths = list_source(d) * 2
    with caplog.at_level(logging.WARNING, logger="osediff.train.data"):
        kept = scan_images(paths, min_side=64)
    names = sorted({p.rsplit("/", 1)[1] for p in kept})
    # the truncated JPEG has a valid header: it is caught when decoded (next test)
    assert names == ["a_rgb.png", "b_gray.png", "c_rgba.png", "d_16bit.png", "g_truncated.jpg"]
    assert len(kept) == 10
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 of 7" in warnings[0].message and "1 smaller" in warnings[0].message \
        and "1 unreadable" in warnings[0].message


def test_items_are_seeded_crops_and_bad_files_are_replaced(tmp_path, caplog):
    d = bad_folder(tmp_path)
    paths = scan_images(list_source(d), min_side=64)
    ds = TrainImages(paths, crop=64)
    for i in range(len(ds)):
        item = ds[(i, 123)]
        assert item["hq"].shape == (3, 64, 64) and item["hq"].dtype == torch.float32
        assert 0 <= item["hq"].min() and item["hq"].max() <= 1
    # the same key gives the same crop; another seed another crop
    torch.testing.assert_close(ds[(0, 5)]["hq"], ds[(0, 5)]["hq"])
    assert not torch.equal(ds[(0, 5)]["hq"], ds[(0, 6)]["hq"])
    # grayscale -> equal channels; the truncated file is replaced by the next image, with a warning
    gray = ds[(paths.index(str(d / "b_gray.png")), 1)]["hq"]
    assert torch.equal(gray[0], gray[1])
    with caplog.at_level(logging.WARNING, logger="osediff.train.data"):
        item = ds[(paths.index(str(d / "g_truncated.jpg")), 1)]
    assert item["path"] == paths[(paths.index(str(d / "g_truncated.jpg")) + 1) % len(paths)]
    assert any("g_truncated.jpg" in r.message for r in caplog.records)


def test_crop_is_a_window_of_the_image(tmp_path):
    p = write_rgb(tmp_path / "x.png", 50, 40, 7)
    full = torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1).float() / 255
    crop = TrainImages([p], crop=16)[(0, 11)]["hq"]
    flipped = crop.flip(-1)
    hits = [(y, x) for y in range(25) for x in range(35)
            if torch.equal(full[:, y:y + 16, x:x + 16], crop) or torch.equal(full[:, y:y + 16, x:x + 16], flipped)]
    assert len(hits) == 1


def test_face_mode_resizes_to_the_crop(tmp_path):
    p = write_rgb(tmp_path / "face.png", 40, 30, 8)  # smaller than the crop: resized, not skipped
    assert scan_images([p], min_side=0) == [p]
    item = TrainImages([p], crop=64, face=True)[(0, 3)]
    assert item["hq"].shape == (3, 64, 64)


def test_epoch_sampler_order_padding_and_resume():
    s = EpochSampler(num_items=5, global_batch=4, seed=1)
    assert s.epoch_length == 8
    e0 = list(s)
    assert sorted(i for i, _ in e0[:5]) == [0, 1, 2, 3, 4]  # a permutation, then wrapped around
    assert [i for i, _ in e0[5:]] == [i for i, _ in e0[:3]]
    assert len({seed for _, seed in e0}) == 8  # one crop seed per position
    s.set_epoch(1)
    e1 = list(s)
    assert [i for i, _ in e1] != [i for i, _ in e0]
    s.resume(1, 4)
    assert list(s) == e1[4:] and len(s) == 4
    s.set_epoch(1)  # accelerate calls this again before iterating: the position must survive
    assert list(s) == e1[4:]
    s.set_epoch(2)
    assert len(s) == 8


def test_captions(tmp_path):
    (tmp_path / "c.json").write_text('{"a.png": "a cat", "/x/b.png": "a dog"}')
    (tmp_path / "c.txt").write_text("a\tcat on a mat\n\n/x/b.png\ta dog\n")
    js, txt = read_captions(tmp_path / "c.json"), read_captions(tmp_path / "c.txt")
    assert caption_for(js, "/data/a.png") == "a cat" and caption_for(js, "/x/b.png") == "a dog"
    assert caption_for(txt, "/data/a.png") == "cat on a mat" and caption_for(txt, "/y/b.png") is None
    (tmp_path / "bad.txt").write_text("no tab here\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        read_captions(tmp_path / "bad.txt")
