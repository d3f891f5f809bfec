import numpy as np
import pytest
from PIL import Image

from osediff.files.images import ImageReadError, Picture, read_image, write_image

DEFAULT_PILLOW_LIMIT = Image.MAX_IMAGE_PIXELS


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


def _chunk(t, d):
    import struct
    import zlib

    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)


def png16(path, arr, exif=None):
    """A 16-bit PNG (H, W, C) written by hand, optionally with an eXIf chunk."""
    import struct
    import zlib

    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    extra = _chunk(b"eXIf", exif[6:]) if exif else b""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0)) + extra
                     + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))


def bomb_png(path, w=30000, h=30000):
    """A valid-looking 8-bit RGB PNG header claiming w×h, with a few bytes of image data."""
    import struct
    import zlib

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


def test_grayscale_is_marked_and_written_back_as_grayscale(tmp_path):
    rng = np.random.default_rng(0)
    g8 = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    Image.fromarray(g8, "L").save(tmp_path / "g.png")
    pic = read_image(tmp_path / "g.png")
    assert pic.gray and pic.rgb.shape == (6, 5, 3)  # the networks see RGB
    write_image(tmp_path / "o.png", pic)
    with Image.open(tmp_path / "o.png") as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), g8)  # luma of equal planes = the plane
    la = np.dstack([g8, 255 - g8])
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    write_image(tmp_path / "la_out.png", read_image(tmp_path / "la.png"))
    with Image.open(tmp_path / "la_out.png") as im:
        assert im.mode == "LA" and np.array_equal(np.asarray(im), la)
    g16 = (rng.random((5, 7, 1)) * 65535).astype(np.uint16)
    png16(tmp_path / "g16.png", g16)
    p16 = read_image(tmp_path / "g16.png")
    assert p16.gray and p16.bits == 16
    write_image(tmp_path / "g16_out.png", p16)
    import png

    _, _, rows, info = png.Reader(filename=str(tmp_path / "g16_out.png")).asDirect()
    assert info["greyscale"] and info["bitdepth"] == 16 and not info["alpha"]
    assert np.array_equal(np.vstack([np.asarray(r) for r in rows]), g16[..., 0])
    la16 = (rng.random((4, 3, 2)) * 65535).astype(np.uint16)
    png16(tmp_path / "la16.png", la16)
    write_image(tmp_path / "la16_out.png", read_image(tmp_path / "la16.png"))
    _, _, rows, info = png.Reader(filename=str(tmp_path / "la16_out.png")).asDirect()
    assert info["greyscale"] and info["alpha"] and info["bitdepth"] == 16
    assert np.array_equal(np.vstack([np.asarray(r) for r in rows]).reshape(4, 3, 2), la16)


def test_gray_output_is_the_bt601_luma_of_the_result():
    from osediff.files.images import luma601

    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 200, 30]]], np.uint8)
    assert luma601(rgb).tolist() == [[76, 150, 29, round(0.299 * 10 + 0.587 * 200 + 0.114 * 30)]]
    im = Image.fromarray(np.random.default_rng(1).integers(0, 256, (9, 9, 3), dtype=np.uint8))
    assert np.abs(luma601(np.asarray(im)).astype(int) - np.asarray(im.convert("L"))).max() <= 1  # Pillow's L


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, monkeypatch):
    import resource

    from PIL import ImageFile

    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    bomb_png(tmp_path / "bomb.png")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with pytest.raises(ImageReadError, match=r"bomb.png.*30000x30000 = 900 megapixels.*--max-input-megapixels"):
        read_image(tmp_path / "bomb.png")
    # without the megapixel cap, the file size still gives it away: ~100 bytes cannot inflate to 2.7 GB
    with pytest.raises(ImageReadError, match=r"bomb.png.*decompression bomb"):
        read_image(tmp_path / "bomb.png", max_megapixels=0)
    assert loads == []  # Pillow allocates the pixels in load(), which was never reached
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100_000  # no 2.7 GB peak
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_PILLOW_LIMIT  # Pillow's own setting is restored
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "ok.png")
    read_image(tmp_path / "ok.png")
    assert set(loads) == {(4, 4)}  # (the spy does see real loads)


def test_the_limit_is_the_users_not_pillows(tmp_path):
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ImageReadError, match=r"400x300 = 0.12 megapixels, above --max-input-megapixels 0.1"):
        read_image(tmp_path / "a.png", max_megapixels=0.1)
    assert read_image(tmp_path / "a.png", max_megapixels=0.2).size == (400, 300)


def test_multi_frame_files_give_their_first_frame_and_a_warning(tmp_path, caplog):
    frames = [Image.fromarray(np.full((8, 10, 3), v, np.uint8)) for v in (10, 120, 250)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    pic = read_image(tmp_path / "anim.gif")
    assert pic.size == (10, 8) and abs(int(pic.rgb.mean()) - 10) <= 2
    assert "anim.gif: 3 frames; only the first is processed" in caplog.text
    frames[0].save(tmp_path / "pages.tif", save_all=True, append_images=frames[1:])
    assert read_image(tmp_path / "pages.tif").size == (10, 8) and "pages.tif: 3 frames" in caplog.text


def test_whatever_a_decoder_raises_is_an_image_read_error(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "ok.png")

    def odd(self):
        raise ZeroDivisionError("a decoder bug")

    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", odd)
    with pytest.raises(ImageReadError, match="ok.png: ZeroDivisionError"):
        read_image(tmp_path / "ok.png")
    (tmp_path / "empty.png").write_bytes(b"")
    monkeypatch.undo()
    with pytest.raises(ImageReadError, match="empty.png"):
        read_image(tmp_path / "empty.png")
