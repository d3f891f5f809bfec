"""`osediff sr` on a phone/camera folder: HEIC (also named .jpg), 10-bit HEIC, AVIF, JPEG XL, DNG, 16-bit TIFF;
what is not a picture is named and left alone, a folder without pictures is an error, a missing reader is one
file's failure with its install line, and `--ext` picks per source. Fixtures are built at run time."""

import numpy as np
import pytest
from PIL import Image

from osediff.cli import main
from osediff.files import formats
from osediff.files.images import read_image
from osediff.files.samples import photo_folder, sample_rgb, srgb_icc, write_heic


@pytest.fixture
def args(sr_args):
    return sr_args


def test_the_photo_folder(tmp_path, args, caplog):
    """The issue's check: six ×4 outputs at the oriented size, 16-bit where the source had more than 8 bits, the
    ICC profile kept, notes.txt named as ignored, exit status 0."""
    caplog.set_level("INFO")
    src = photo_folder(tmp_path / "photos")  # 24×16 pictures (the DNG 48×32), phone.jpg with orientation 6
    icc = srgb_icc()
    out = tmp_path / "out"
    assert main(["sr", str(tmp_path / "photos"), "-o", str(out), *args]) == 0
    assert "ignored 1 file that is not an image: notes.txt" in caplog.text
    got = {p.name: read_image(p) for p in out.glob("*.png")}
    assert set(got) == {"phone.png", "deep.png", "web.png", "art.png", "camera.png", "scan.png"}
    sizes = {n: p.size for n, p in got.items()}
    assert sizes == {"phone.png": (64, 96), "deep.png": (96, 64), "web.png": (96, 64), "art.png": (96, 64),
                     "camera.png": (192, 128), "scan.png": (96, 64)}
    assert {n for n, p in got.items() if p.bits == 16} == {"deep.png", "camera.png", "scan.png"}
    assert read_image(src["phone.jpg"]).meta.icc == got["phone.png"].meta.icc
    for n in ("phone.png", "web.png", "scan.png"):
        assert got[n].meta.icc[36:] == icc[36:]  # (bytes 24–35 are the profile's creation time)
    assert got["art.png"].meta.icc  # libjxl's own description of the same colour space


def test_no_image_at_all_is_an_error(tmp_path, args, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["sr", str(empty), "-o", str(tmp_path / "out"), *args]) == 2
    assert f"no images found in {empty}" in caplog.text
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("beach\n")
    (notes / ".DS_Store").write_bytes(bytes(range(256)) * 4)
    caplog.clear()
    assert main(["sr", str(notes), "-o", str(tmp_path / "out"), *args]) == 2
    assert "ignored 2 files that are not images: .DS_Store, notes.txt" in caplog.text
    assert "no images found" in caplog.text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_missing_reader_fails_its_file_with_the_install_line(tmp_path, args, caplog, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    write_heic(src / "phone.jpg", sample_rgb(16, 12))
    Image.fromarray(sample_rgb(16, 12, 1)).save(src / "fine.png")
    real = formats.has_module
    monkeypatch.setattr(formats, "has_module", lambda name: name != "pillow_heif" and real(name))
    assert main(["sr", str(src), "-o", str(tmp_path / "out"), *args]) == 1
    assert 'phone.jpg: reading HEIF needs pillow_heif: pip install "osediff[heic]"' in caplog.text
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["fine.png"]


def test_ext_auto_picks_per_source(tmp_path, args):
    src = photo_folder(tmp_path / "photos")
    Image.fromarray(sample_rgb(16, 12, 7)).save(tmp_path / "photos" / "plain.jpg", quality=90)
    Image.fromarray(sample_rgb(16, 12, 8)).save(tmp_path / "photos" / "web.webp")
    src["web.avif"].rename(tmp_path / "photos" / "still.avif")  # (web.webp and web.avif would meet in web.*)
    out = tmp_path / "out"
    assert main(["sr", str(tmp_path / "photos"), "-o", str(out), *args, "--ext", "auto"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["art.png", "camera.tiff", "deep.png", "phone.png", "plain.jpg", "scan.tif", "still.png",
                     "web.webp"]
    assert read_image(out / "camera.tiff").bits == 16 and read_image(out / "scan.tif").bits == 16
    assert read_image(out / "deep.png").bits == 16
    from PIL import JpegImagePlugin

    with Image.open(out / "plain.jpg") as im:
        assert JpegImagePlugin.get_sampling(im) == 0  # 4:4:4


@pytest.mark.parametrize("ext,bits", [("tiff", 16), ("heic", 16), ("avif", 8), ("jxl", 8)])
def test_explicit_ext_writes_that_format(tmp_path, args, ext, bits):
    src = tmp_path / "in"
    src.mkdir()
    deep = sample_rgb(16, 12, 3, bits=10)
    write_heic(src / "deep.heic", deep, bits=10)
    out = tmp_path / "out"
    assert main(["sr", str(src), "-o", str(out), *args, "--ext", ext]) == 0
    pic = read_image(out / f"deep.{ext}")
    assert pic.size == (64, 48) and pic.bits == bits
    assert formats.identify(out / f"deep.{ext}") == {"tiff": "tiff", "heic": "heif", "avif": "avif", "jxl": "jxl"}[ext]
    if ext == "heic":  # written at 10 bits: more than 256 levels survive
        assert len(np.unique(pic.rgb >> 6)) > 256


def test_dry_run_lists_pictures_and_names_the_rest(tmp_path, capsys):
    photo_folder(tmp_path / "photos")
    assert main(["sr", str(tmp_path / "photos"), "-o", str(tmp_path / "out"), "--dry-run", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "phone.jpg" in out and "camera.dng" in out and "# ignored 1 file that is not an image: notes.txt" in out
    (tmp_path / "none").mkdir()
    assert main(["sr", str(tmp_path / "none"), "-o", str(tmp_path / "out"), "--dry-run", "--device", "cpu"]) == 2
    assert "# no images found in" in capsys.readouterr().out
