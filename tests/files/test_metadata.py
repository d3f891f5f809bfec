"""Metadata round trips: ICC bytes, EXIF (orientation reset, dimensions updated), PNG text and DPI, into every
format that can hold them, including our 16-bit PNG writer."""

import functools

import numpy as np
import pytest
from PIL import Image, ImageCms

from osediff.files.images import Picture, read_image, write_image
from osediff.files.metadata import Metadata, exif_for_output, read_metadata

MAKE, MODEL, DATETIME, ORIENTATION, GPS, EXIF_IFD, PIXEL_X, PIXEL_Y = (0x010F, 0x0110, 0x0132, 0x0112, 0x8825,
                                                                       0x8769, 0xA002, 0xA003)


@functools.lru_cache(maxsize=1)
def _icc() -> bytes:
    """One profile per session: LittleCMS stamps each new one with the current time (a second apart, two differ)."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _exif(orientation=6) -> bytes:
    e = Image.Exif()
    e[MAKE], e[MODEL], e[DATETIME], e[ORIENTATION] = "Canon", "EOS R5", "2024:05:01 12:34:56", orientation
    e.get_ifd(GPS)[2] = (48.0, 51.0, 29.0)  # GPSLatitude
    sub = e.get_ifd(EXIF_IFD)
    sub[PIXEL_X], sub[PIXEL_Y] = 20, 10
    return e.tobytes()


def _photo(tmp_path, name="in.jpg", size=(20, 10)):
    a = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / name, icc_profile=_icc(), exif=_exif(), dpi=(300, 300))
    return tmp_path / name


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp", ".tif"])
def test_icc_and_exif_survive_into_every_format(tmp_path, ext):
    pic = read_image(_photo(tmp_path))  # EXIF orientation 6: the 20×10 file is a 10×20 picture
    assert pic.size == (10, 20) and pic.meta.icc == _icc()
    big = Picture(np.repeat(np.repeat(pic.rgb, 4, 0), 4, 1), meta=pic.meta)  # a "×4 result", 40×80
    write_image(tmp_path / f"out{ext}", big)
    with Image.open(tmp_path / f"out{ext}") as im:
        assert im.size == (40, 80)
        assert im.info.get("icc_profile") == _icc()  # byte for byte
        e = im.getexif()
        assert (e[MAKE], e[MODEL], e[DATETIME]) == ("Canon", "EOS R5", "2024:05:01 12:34:56")
        assert e.get(ORIENTATION, 1) == 1  # the pixels are already upright
        assert e.get_ifd(GPS)[2] == (48.0, 51.0, 29.0)
        sub = e.get_ifd(EXIF_IFD)
        assert (sub[PIXEL_X], sub[PIXEL_Y]) == (40, 80)
        if ext != ".webp":  # WebP has no resolution field
            assert tuple(round(v) for v in im.info["dpi"]) == (300, 300)
    again = read_image(tmp_path / f"out{ext}")
    assert again.size == (40, 80)  # not rotated a second time


def test_png_text_and_16bit_png_keep_metadata(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Author", "Ann")
    info.add_text("Title", "Zürich ünïcödé ✓")  # not Latin-1: iTXt
    info.add_text("XML:com.adobe.xmp", "<x:xmpmeta tiff:Orientation='6'/>")  # repeats the orientation: dropped
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "t.png", pnginfo=info, icc_profile=_icc(),
                                                        exif=_exif(1), dpi=(72, 72))
    meta = read_image(tmp_path / "t.png").meta
    assert dict(meta.text) == {"Author": "Ann", "Title": "Zürich ünïcödé ✓"}
    deep = Picture((np.random.default_rng(0).random((12, 16, 3)) * 65535).astype(np.uint16), meta=meta)
    write_image(tmp_path / "deep.png", deep)  # written by pypng; our chunks are spliced in
    back = read_image(tmp_path / "deep.png")
    assert back.bits == 16 and np.array_equal(back.rgb, deep.rgb)
    assert back.meta.icc == _icc() and dict(back.meta.text) == dict(meta.text)
    assert tuple(round(v) for v in back.meta.dpi) == (72, 72)
    with Image.open(tmp_path / "deep.png") as im:
        assert im.getexif()[MODEL] == "EOS R5" and im.getexif().get_ifd(EXIF_IFD)[PIXEL_X] == 16


def test_16bit_png_orientation_is_applied(tmp_path):
    from test_imageio import png16

    a = (np.arange(2 * 3 * 3, dtype=np.uint16).reshape(2, 3, 3) * 3000)
    png16(tmp_path / "r.png", a, exif=_exif(6))
    pic = read_image(tmp_path / "r.png")
    expected = np.asarray(Image.fromarray((a >> 8).astype(np.uint8)).transpose(Image.Transpose.ROTATE_270))
    assert pic.size == (2, 3) and np.array_equal((pic.rgb >> 8).astype(np.uint8), expected)


def test_strip_and_no_metadata_write_nothing(tmp_path):
    pic = read_image(_photo(tmp_path))
    write_image(tmp_path / "bare.jpg", Picture(pic.rgb))
    with Image.open(tmp_path / "bare.jpg") as im:
        assert "icc_profile" not in im.info and not len(im.getexif())


def test_tiff_structure_tags_do_not_travel(tmp_path):
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "a.tif", exif=_exif(1))
    with Image.open(tmp_path / "a.tif") as im:
        meta = read_metadata(im)
    e = Image.Exif()
    e.load(exif_for_output(meta.exif, (32, 24)))
    assert e[MAKE] == "Canon" and not {256, 257, 258, 273, 279} & set(e)


def test_broken_exif_costs_the_exif_not_the_photo(tmp_path, caplog):
    assert exif_for_output(b"Exif\x00\x00MM\x00*garbage", (4, 4)) is None
    pic = Picture(np.zeros((4, 4, 3), np.uint8), meta=Metadata(exif=b"Exif\x00\x00MM\x00*garbage"))
    write_image(tmp_path / "o.png", pic)
    assert read_image(tmp_path / "o.png").size == (4, 4)


@pytest.mark.parametrize("ext,bits", [(".heic", 8), (".heic", 16), (".avif", 8), (".jxl", 8), (".tiff", 16)])
def test_metadata_rows_of_the_optional_formats(tmp_path, ext, bits):
    """README's metadata table, one row per new writer: what a ×4 result written as `ext` keeps."""
    import io

    from PIL import ImageCms

    pic = read_image(_photo(tmp_path))
    rgb = np.repeat(np.repeat(pic.rgb, 4, 0), 4, 1)
    rgb = rgb.astype(np.uint16) * 257 if bits == 16 else rgb
    write_image(tmp_path / f"out{ext}", Picture(rgb, meta=pic.meta))
    back = read_image(tmp_path / f"out{ext}")
    assert back.size == (40, 80) and back.bits == bits  # upright, not rotated a second time; depth kept
    if ext == ".jxl":  # libjxl stores the colour space and hands back its own profile of it
        desc = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(back.meta.icc)))
        assert "srgb" in desc.lower().replace(" ", "").replace("-", "")
    else:
        assert back.meta.icc == pic.meta.icc  # byte for byte
    e = Image.Exif()
    e.load(back.meta.exif)
    assert (e[MAKE], e[MODEL], e[DATETIME]) == ("Canon", "EOS R5", "2024:05:01 12:34:56")
    assert e.get(ORIENTATION, 1) == 1
    if ext == ".tiff":  # tifffile writes IFD0 tags only: no Exif/GPS sub-directories; DPI in the TIFF fields
        assert EXIF_IFD not in e and GPS not in e
        assert back.meta.dpi == (300.0, 300.0)
    else:
        assert (e.get_ifd(EXIF_IFD)[PIXEL_X], e.get_ifd(EXIF_IFD)[PIXEL_Y]) == (40, 80)
        assert e.get_ifd(GPS)[2] == (48.0, 51.0, 29.0)
        assert back.meta.dpi is None
