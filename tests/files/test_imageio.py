import numpy as np
import pytest
from PIL import Image

from osediff.files.images import ImageReadError, Picture, read_image, write_image


def test_modes_become_rgb(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    for mode, name in [("L", "g.png"), ("P", "p.png"), ("CMYK", "c.jpg"), ("1", "b.png"), ("RGB", "r.webp")]:
        Image.fromarray(a).convert(mode).save(tmp_path / name)
        pic = read_image(tmp_path / name)
        assert pic.rgb.shape == (6, 5, 3) and pic.rgb.dtype == np.uint8 and pic.alpha is None, mode


def test_16bit_grayscale_and_palette_transparency(tmp_path):
    g = (np.arange(30, dtype=np.uint16).reshape(5, 6) * 2000)
    Image.fromarray(g).save(tmp_path / "g16.png")  # uint16 -> mode I;16
    pic = read_image(tmp_path / "g16.png")
    assert pic.bits == 16 and np.array_equal(pic.rgb[..., 1], g)
    p = Image.fromarray(np.zeros((4, 4, 3), np.uint8)).convert("P")
    p.info["transparency"] = 0
    p.save(tmp_path / "t.png", transparency=0)
    assert read_image(tmp_path / "t.png").alpha is not None


def test_16bit_round_trip(tmp_path):
    rgb = (np.random.default_rng(0).random((7, 9, 3)) * 65535).astype(np.uint16)
    alpha = (np.random.default_rng(1).random((7, 9)) * 65535).astype(np.uint16)
    write_image(tmp_path / "x.png", Picture(rgb, alpha))
    back = read_image(tmp_path / "x.png")
    assert np.array_equal(back.rgb, rgb) and np.array_equal(back.alpha, alpha)


def test_unreadable_files_name_themselves(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        read_image(tmp_path / "bad.jpg")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="trunc.png"):
        read_image(tmp_path / "trunc.png")


def test_write_is_atomic(tmp_path, monkeypatch):
    pic = Picture(np.zeros((4, 4, 3), np.uint8))

    def fail(self, fp, *a, **k):
        open(fp, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(OSError):
        write_image(tmp_path / "o.png", pic)
    assert list(tmp_path.iterdir()) == []
