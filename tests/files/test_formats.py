"""Recognition by content and the optional readers (HEIC, AVIF, JPEG XL, camera RAW, 16-bit/float TIFF); every
fixture is built here at run time (`osediff.files.samples`)."""

import numpy as np
import pytest
from PIL import Image

from osediff.files import formats
from osediff.files.extras import widen
from osediff.files.images import (
    ImageReadError,
    MissingReaderError,
    Picture,
    is_image_file,
    read_image,
    write_image,
)
from osediff.files.samples import (
    sample_rgb,
    srgb_icc,
    write_dng,
    write_heic,
    write_pillow,
    write_tiff16,
)

ROT6 = lambda a: np.rot90(a, -1)  # noqa: E731  (EXIF orientation 6: turn 90° clockwise to show)


def test_content_decides_not_the_name(tmp_path):
    rgb = sample_rgb(12, 8)
    write_heic(tmp_path / "phone.jpg", rgb)
    write_pillow(tmp_path / "a.avif", rgb, "AVIF")
    write_pillow(tmp_path / "a.jxl", rgb, "JXL")
    write_dng(tmp_path / "cam.dng", 16, 12)
    write_tiff16(tmp_path / "scan.tif", sample_rgb(12, 8, bits=16))
    Image.fromarray(rgb).save(tmp_path / "really_png.jpg", format="PNG")
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "broken.jpg").write_bytes(b"garbage, but named like a photo")
    (tmp_path / "blob").write_bytes(np.random.default_rng(0).bytes(4096))
    kinds = {p.name: formats.identify(p) for p in tmp_path.iterdir()}
    assert kinds == {"phone.jpg": "heif", "a.avif": "avif", "a.jxl": "jxl", "cam.dng": "raw", "scan.tif": "tiff",
                     "really_png.jpg": "png", "notes.txt": None, "broken.jpg": "pillow", "blob": None}
    assert not is_image_file(tmp_path / "notes.txt") and is_image_file(tmp_path / "phone.jpg")
    with pytest.raises(ImageReadError, match="broken.jpg"):  # looks like a photo: a failure, not ignored
        read_image(tmp_path / "broken.jpg")


@pytest.mark.parametrize("head,suffix,kind", [
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", ".x", "heif"),
    (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1avif", ".x", "avif"),
    (b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01crx isom", ".x", "raw"),
    (b"II*\x00\x10\x00\x00\x00CR\x02\x00", ".x", "raw"),  # Canon CR2
    (b"II*\x00\x08\x00\x00\x00\x00\x00", ".nef", "raw"),
    (b"II*\x00\x08\x00\x00\x00\x00\x00", ".tif", "tiff"),
    (b"FUJIFILMCCD-RAW 0201", ".x", "raw"),
    (b"\xff\x0a\x00", ".x", "jxl"),
    (b"hello world", ".jpg", None),
])
def test_signatures(head, suffix, kind):
    assert formats.sniff(head + bytes(40), suffix) == kind


def test_auto_extension_never_writes_raw(tmp_path):
    rgb = sample_rgb(12, 8)
    made = {"a.jpg": lambda p: Image.fromarray(rgb).save(p), "b.png": lambda p: Image.fromarray(rgb).save(p),
            "c.webp": lambda p: Image.fromarray(rgb).save(p), "d.tif": lambda p: Image.fromarray(rgb).save(p),
            "e.heic": lambda p: write_heic(p, rgb), "f.jpg": lambda p: write_heic(p, rgb),
            "g.avif": lambda p: write_pillow(p, rgb, "AVIF"), "h.jxl": lambda p: write_pillow(p, rgb, "JXL"),
            "i.dng": lambda p: write_dng(p, 16, 12), "j.gif": lambda p: Image.fromarray(rgb).save(p)}
    for name, make in made.items():
        make(tmp_path / name)
    got = {n: formats.auto_extension(tmp_path / n) for n in made}
    assert got == {"a.jpg": "jpg", "b.png": "png", "c.webp": "webp", "d.tif": "tif", "e.heic": "png",
                   "f.jpg": "png", "g.avif": "png", "h.jxl": "png", "i.dng": "tiff", "j.gif": "gif"}


def test_heic_named_jpg_with_orientation_and_icc(tmp_path):
    rgb, icc = sample_rgb(24, 16, 1), srgb_icc()
    pic = read_image(write_heic(tmp_path / "phone.jpg", rgb, orientation=6, icc=icc))
    assert pic.size == (16, 24) and pic.bits == 8  # shown upright: rotated once
    assert pic.meta.icc == icc
    assert np.abs(pic.rgb.astype(int) - ROT6(rgb)).mean() < 2  # the right way round, not mirrored
    assert Image.Exif().load(pic.meta.exif) is None or True
    e = Image.Exif()
    e.load(pic.meta.exif)
    assert e.get(0x0112, 1) == 1 and e[0x010F] == "Osediff"  # orientation consumed, camera kept


@pytest.mark.parametrize("bits", [10, 12])
def test_deep_heic_is_read_at_full_depth(tmp_path, bits):
    src = sample_rgb(24, 16, 2, bits=bits)
    pic = read_image(write_heic(tmp_path / "deep.heic", src, bits=bits))
    assert pic.bits == 16 and pic.size == (24, 16)
    assert np.abs((pic.rgb >> (16 - bits)).astype(int) - src).max() <= 1  # every one of the bits survived
    assert len(np.unique(pic.rgb >> (16 - bits))) > 256  # more levels than 8 bits could hold


def test_widen_fills_the_16_bit_range():
    v = np.array([0, 1, 512, 1023], dtype=np.uint16) << 6
    assert widen(v, 10).tolist() == [0, 64 | 0, 32768 | 32, 65535]
    exact = np.rint(np.arange(1024) * 65535 / 1023)
    assert np.abs(widen(np.arange(1024, dtype=np.uint16) << 6, 10) - exact).max() <= 1


@pytest.mark.parametrize("fmt", ["AVIF", "JXL"])
def test_avif_and_jxl_orientation_applied_once(tmp_path, fmt):
    rgb = sample_rgb(24, 16, 3)
    pic = read_image(write_pillow(tmp_path / f"x.{fmt.lower()}", rgb, fmt, orientation=6, icc=srgb_icc()))
    assert pic.size == (16, 24) and pic.bits == 8
    diff = np.abs(pic.rgb.astype(int) - ROT6(rgb)).mean()
    assert diff < 8 and np.abs(pic.rgb.astype(int) - np.rot90(rgb, 1)).mean() > 4 * diff  # not the other turn
    assert pic.meta.icc


@pytest.mark.parametrize("orientation", [1, 6])
def test_dng_develops_at_16_bits_the_right_way_round(tmp_path, orientation):
    pic = read_image(write_dng(tmp_path / "cam.dng", 96, 64, orientation=orientation))
    assert pic.bits == 16 and pic.alpha is None
    r, g, b = (pic.rgb[..., c].astype(float) for c in range(3))
    if orientation == 6:  # the scene's x axis now runs top to bottom, its y axis right to left
        assert pic.size == (64, 96)
        r, g, b = (np.rot90(c, 1) for c in (r, g, b))
    else:
        assert pic.size == (96, 64)
    inner = (slice(4, -4), slice(4, -4))  # away from demosaic borders
    assert np.all(np.diff(r[inner].mean(0)) > 0) and np.all(np.diff(g[inner].mean(1)) > 0)  # the ramps
    assert r[inner].mean(1).std() < 0.02 * 65535 and b[inner].std() < 0.05 * 65535  # and nothing else
    e = Image.Exif()
    e.load(pic.meta.exif)
    assert (e[0x010F], e[0x0110], e[0x0132]) == ("Osediff", "Sample DNG", "2024:05:06 07:08:09")


def test_tiff16_round_trip_orientation_and_float(tmp_path):
    icc = srgb_icc()
    src = sample_rgb(24, 16, 5, bits=16)
    pic = read_image(write_tiff16(tmp_path / "scan.tif", src, icc=icc))
    assert pic.bits == 16 and np.array_equal(pic.rgb, src) and pic.meta.icc == icc
    write_image(tmp_path / "out.tiff", pic)
    back = read_image(tmp_path / "out.tiff")
    assert back.bits == 16 and np.array_equal(back.rgb, src) and back.meta.icc == icc
    assert np.array_equal(read_image(write_tiff16(tmp_path / "r.tif", src, orientation=6)).rgb, ROT6(src))
    f = np.random.default_rng(0).random((8, 10, 3)).astype(np.float32) * 1.2 - 0.1
    got = read_image(write_tiff16(tmp_path / "f.tif", f)).rgb
    assert np.array_equal(got, np.rint(np.clip(f, 0, 1) * 65535).astype(np.uint16))
    f_icc = read_image(write_tiff16(tmp_path / "f6.tif", f, orientation=6, icc=icc))  # Pillow cannot open these
    assert f_icc.size == (8, 10) and f_icc.meta.icc == icc
    rgba = np.dstack([src, src[..., 0]])
    pic = read_image(write_tiff16(tmp_path / "a.tif", rgba))
    assert np.array_equal(pic.alpha, src[..., 0])
    write_image(tmp_path / "a_out.tif", pic)
    assert np.array_equal(read_image(tmp_path / "a_out.tif").alpha, src[..., 0])


def test_png16_round_trip(tmp_path):
    src = sample_rgb(24, 16, 6, bits=16)
    write_image(tmp_path / "x.png", Picture(src))
    assert np.array_equal(read_image(tmp_path / "x.png").rgb, src)


@pytest.mark.parametrize("kind,module,extra", [("heif", "pillow_heif", "heic"), ("jxl", "pillow_jxl", "jxl"),
                                               ("raw", "rawpy", "raw"), ("tiff16", "tifffile", "tiff")])
def test_a_missing_reader_names_its_install_line(tmp_path, monkeypatch, kind, module, extra):
    make = {"heif": lambda p: write_heic(p, sample_rgb(8, 8)), "jxl": lambda p: write_pillow(p, sample_rgb(8, 8), "JXL"),
            "raw": lambda p: write_dng(p, 16, 12), "tiff16": lambda p: write_tiff16(p, sample_rgb(8, 8, bits=16))}
    path = make[kind](tmp_path / ("photo.dng" if kind == "raw" else "photo.jpg"))
    real = formats.has_module
    monkeypatch.setattr(formats, "has_module", lambda name: name != module and real(name))
    with pytest.raises(MissingReaderError, match=rf'photo\.(jpg|dng).*pip install "osediff\[{extra}\]"'):
        read_image(path)


def test_raw_is_never_written(tmp_path):
    with pytest.raises(ValueError, match="RAW"):
        write_image(tmp_path / "x.dng", Picture(sample_rgb(8, 8)))
