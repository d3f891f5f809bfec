"""Small pictures in every format the readers take, built at run time (no binary files in the repository): for
the tests, the web page's browser test, and for checking an install by hand (`photo_folder`).

The camera RAW is a synthetic Bayer DNG written with tifffile: a CFA image plus the DNG tags LibRaw needs to
develop it (CFARepeatPatternDim, CFAPattern, DNGVersion, BlackLevel, WhiteLevel, ColorMatrix1, AsShotNeutral,
Orientation; DNG 1.4 spec, chapter 4). Each writer needs the library of its format (pillow-heif,
pillow-jxl-plugin, tifffile; AVIF: Pillow's codec), imported inside it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ORIENTATION, MAKE, MODEL, DATETIME = 0x0112, 0x010F, 0x0110, 0x0132


def sample_rgb(w: int, h: int, seed: int = 0, bits: int = 8) -> np.ndarray:
    """(h, w, 3) uint8 (or uint16 for bits > 8): smooth colour ramps plus mild noise, so resizes and codecs
    have structure to keep; the values use the full range of `bits` (a 10-bit sample tops out at 1023)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / np.array([max(h - 1, 1), max(w - 1, 1)])[:, None, None]
    base = np.stack([x, y, 0.5 + 0.4 * np.sin(6 * x * y)], -1) * 0.8 + 0.1
    v = np.clip(base + rng.normal(0, 0.02, base.shape), 0, 1) * (2 ** bits - 1)
    return np.rint(v).astype(np.uint8 if bits <= 8 else np.uint16)


def srgb_icc() -> bytes:
    """An sRGB ICC profile made by LittleCMS (through Pillow's ImageCms)."""
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def exif_bytes(orientation: int = 1, make: str = "Osediff", model: str = "Sample") -> bytes:
    from PIL import Image

    e = Image.Exif()
    e[ORIENTATION], e[MAKE], e[MODEL], e[DATETIME] = orientation, make, model, "2024:05:06 07:08:09"
    return e.tobytes()


def write_heic(path: str | os.PathLike, rgb: np.ndarray, *, bits: int = 8, orientation: int = 1,
               icc: bytes | None = None) -> Path:
    """An HEIC of `rgb` (uint8 for 8-bit, uint16 holding `bits`-bit values for 10/12-bit), whatever the file
    name says (an HEIC named .jpg is how phones share photos). The EXIF orientation becomes HEIF's own
    rotation (pillow-heif moves it into the irot/imir boxes)."""
    import pillow_heif

    path, h, w = Path(path), *rgb.shape[:2]
    if bits > 8:
        heif = pillow_heif.from_bytes(mode="RGB;16", size=(w, h), data=(rgb << (16 - bits)).astype(np.uint16).tobytes())
        if bits == 12:
            pillow_heif.options.SAVE_HDR_TO_12_BIT = True
    else:
        from PIL import Image

        heif = pillow_heif.from_pillow(Image.fromarray(rgb, "RGB"))
    try:
        heif.save(path, format="HEIF", quality=-1, chroma=444, exif=exif_bytes(orientation), icc_profile=icc)
    finally:
        pillow_heif.options.SAVE_HDR_TO_12_BIT = False
    return path


def write_pillow(path: str | os.PathLike, rgb: np.ndarray, fmt: str, *, orientation: int = 1,
                 icc: bytes | None = None) -> Path:
    """An 8-bit file through a Pillow writer: "AVIF" (Pillow's codec), "JXL" (pillow-jxl-plugin), "JPEG", ..."""
    from PIL import Image

    if fmt == "JXL":
        import pillow_jxl  # noqa: F401  (registers the plugin)
    kw = {"quality": 95} if fmt in ("AVIF", "JXL", "JPEG", "WEBP") else {}
    if icc:
        kw["icc_profile"] = icc
    Image.fromarray(rgb, "RGB").save(path, format=fmt, exif=exif_bytes(orientation), **kw)
    return Path(path)


def write_tiff16(path: str | os.PathLike, rgb: np.ndarray, *, orientation: int = 1, icc: bytes | None = None,
                 ) -> Path:
    """A 16-bit (uint16) or 32-bit float RGB(A) TIFF with an orientation tag, Make/Model and an ICC profile."""
    import tifffile

    tags = [(ORIENTATION, "H", 1, orientation, True), (MAKE, "s", 0, "Osediff", True),
            (MODEL, "s", 0, "Sample", True)]
    extra = ["unassalpha"] if rgb.shape[2] == 4 else None
    tifffile.imwrite(path, rgb, photometric="rgb", extrasamples=extra, iccprofile=icc, extratags=tags,
                     metadata=None)
    return Path(path)


def write_dng(path: str | os.PathLike, w: int = 96, h: int = 64, *, orientation: int = 1) -> Path:
    """A synthetic Bayer (RGGB) DNG of a scene whose red rises left to right and whose green rises top to
    bottom (blue flat), 12-bit data above a black level of 256, neutral white balance, a colour matrix
    that makes the camera's RGB linear sRGB, Make/Model "Osediff"/"Sample DNG". LibRaw develops it like a camera file."""
    import tifffile

    y, x = np.mgrid[0:h, 0:w]
    scene = np.stack([0.1 + 0.8 * x / (w - 1), 0.1 + 0.8 * y / (h - 1), np.full((h, w), 0.4)], -1)
    channel = np.array([[0, 1], [1, 2]])[y % 2, x % 2]  # R G / G B
    cfa = np.take_along_axis(scene, channel[..., None], axis=2)[..., 0]
    data = np.rint(256 + cfa * 3500).astype(np.uint16)
    # XYZ (D65) -> linear sRGB (IEC 61966-2-1), so the camera's RGB is linear sRGB and the developed picture
    # shows the scene's colours
    xyz_to_srgb = (32406, -15372, -4986, -9689, 18758, 415, 557, -2040, 10570)
    tags = [
        (33421, "H", 2, (2, 2), True),  # CFARepeatPatternDim
        (33422, "B", 4, (0, 1, 1, 2), True),  # CFAPattern: R G G B
        (50706, "B", 4, (1, 4, 0, 0), True),  # DNGVersion 1.4
        (50708, "s", 0, "Osediff Sample DNG", True),  # UniqueCameraModel
        (50714, "H", 1, 256, True),  # BlackLevel
        (50717, "H", 1, 4095, True),  # WhiteLevel
        (50778, "H", 1, 21, True),  # CalibrationIlluminant1: D65
        (50721, "2i", 9, tuple(v for m in xyz_to_srgb for v in (m, 10000)), True),  # ColorMatrix1
        (50728, "2I", 3, (1, 1, 1, 1, 1, 1), True),  # AsShotNeutral: white balance 1:1:1
        (ORIENTATION, "H", 1, orientation, True),
        (MAKE, "s", 0, "Osediff", True), (MODEL, "s", 0, "Sample DNG", True),
        (DATETIME, "s", 0, "2024:05:06 07:08:09", True),
    ]
    tifffile.imwrite(path, data, photometric="cfa", extratags=tags, metadata=None)
    return Path(path)


def photo_folder(folder: str | os.PathLike, w: int = 24, h: int = 16) -> dict[str, Path]:
    """The folder of the issue's check: an HEIC named .jpg (orientation 6, ICC), a 10-bit HEIC, an AVIF, a
    JPEG XL, a DNG, a 16-bit RGB TIFF (ICC) and a notes.txt. Returns {name: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    icc = srgb_icc()
    files = {
        "phone.jpg": write_heic(folder / "phone.jpg", sample_rgb(w, h, 1), orientation=6, icc=icc),
        "deep.heic": write_heic(folder / "deep.heic", sample_rgb(w, h, 2, bits=10), bits=10),
        "web.avif": write_pillow(folder / "web.avif", sample_rgb(w, h, 3), "AVIF", icc=icc),
        "art.jxl": write_pillow(folder / "art.jxl", sample_rgb(w, h, 4), "JXL", icc=icc),
        "camera.dng": write_dng(folder / "camera.dng", 2 * w, 2 * h),
        "scan.tif": write_tiff16(folder / "scan.tif", sample_rgb(w, h, 5, bits=16), icc=icc),
    }
    (folder / "notes.txt").write_text("shot list: beach, dunes\n")
    files["notes.txt"] = folder / "notes.txt"
    return files
