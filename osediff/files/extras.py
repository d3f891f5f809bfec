"""The formats that need an optional extra: HEIC/HEIF (pillow-heif), JPEG XL (pillow-jxl-plugin), camera RAW
(rawpy = LibRaw) and 16-bit / float TIFF (tifffile). Each adapter turns the library's output into a `Picture`
(or a `Picture` into a file) and nothing more; `osediff.files.images` decides when to call them, and
`osediff.files.formats.missing_reader` says what to install when one is absent. Every library is imported
inside the function that needs it.

Depth: a 10/12-bit HEIC and a RAW become 16-bit pictures (values scaled to the full 0..65535 range); a float
TIFF is clipped to [0, 1] and scaled the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from osediff.files.metadata import Metadata

log = logging.getLogger(__name__)

_IFD0_TEXT = (0x010F, 0x0110, 0x0132, 0x013B, 0x8298, 0x010E)  # Make, Model, DateTime, Artist,
# Copyright, ImageDescription: the EXIF a plain TIFF directory can hold (tifffile writes no Exif IFD)
EXIF_IFD = 0x8769


def register(kind: str) -> None:
    """Make Pillow open and save `kind` ("heif" or "jxl"); importing the plugin twice is harmless."""
    if kind == "heif":
        import pillow_heif

        pillow_heif.register_heif_opener()
    elif kind == "jxl":
        import pillow_jxl  # noqa: F401  (registers the JXL plugin with Pillow on import)


# --- HEIC at full depth --------------------------------------------------------------------------------------
def widen(a: np.ndarray, bits: int) -> np.ndarray:
    """uint16 holding `bits`-bit values in its top bits (pillow-heif's layout: v << (16 - bits)) -> the full
    0..65535 range by bit replication (1023 -> 65535, 0 -> 0), the exact rounding of v * 65535 / (2^bits - 1)
    to within one step."""
    v = a >> (16 - bits)
    return (v << (16 - bits)) | (v >> (2 * bits - 16)) if bits > 8 else a


def read_heif_deep(path: Path, meta: Metadata, bits: int):
    """A 10/12-bit HEIC as a 16-bit Picture (pillow-heif's own API; its Pillow plugin gives 8 bits). libheif
    applies the file's rotation/mirror (irot/imir) while decoding, so the pixels come upright, and `meta` (read
    through the Pillow plugin, which resets EXIF orientation to 1) does not rotate them again."""
    import pillow_heif

    from osediff.files.images import Picture

    heif = pillow_heif.open_heif(path, convert_hdr_to_8bit=False)
    a = widen(np.asarray(heif), bits)  # (H, W, 3|4) uint16
    alpha = np.ascontiguousarray(a[..., 3]) if a.shape[2] == 4 else None
    return Picture(np.ascontiguousarray(a[..., :3]), alpha, False, meta)


def write_heif(tmp: str, planes: np.ndarray, meta: dict, quality: int) -> None:
    """(H, W, 3|4) uint16 -> a 10-bit HEIC (pillow-heif's default for 16-bit input) with `meta` (`exif`,
    `icc_profile`, the save keywords of `osediff.files.metadata.save_kwargs`)."""
    import pillow_heif

    mode = "RGBA;16" if planes.shape[2] == 4 else "RGB;16"
    h, w = planes.shape[:2]
    heif = pillow_heif.from_bytes(mode=mode, size=(w, h), data=np.ascontiguousarray(planes).tobytes())
    heif.save(tmp, quality=quality, chroma=444, **{k: v for k, v in meta.items() if k in ("exif", "icc_profile")})


# --- camera RAW ----------------------------------------------------------------------------------------------
def read_raw(path: Path, max_megapixels: float):
    """Develop a camera RAW for restoration: the camera's white balance, 16 bits, sRGB primaries and tone
    curve, no auto-brightening, LibRaw's AHD demosaic, the camera's orientation applied (once: the EXIF we
    carry has none). Basic EXIF (camera, lens, exposure, date) comes from the file's TIFF directories where it
    has them (DNG, NEF, CR2, ARW, ...) and from what rawpy reports otherwise."""
    import rawpy

    from osediff.files.images import Picture, refuse_size

    with rawpy.imread(str(path)) as raw:
        refuse_size(path, raw.sizes.width, raw.sizes.height, max_megapixels)
        rgb = raw.postprocess(use_camera_wb=True, output_bps=16, no_auto_bright=True,
                              output_color=rawpy.ColorSpace.sRGB, gamma=(2.4, 12.92))
        exif = _raw_exif(path, raw)
    return Picture(np.ascontiguousarray(rgb), None, False, Metadata(exif=exif))


def _raw_exif(path: Path, raw) -> bytes | None:
    from PIL import Image

    e = Image.Exif()
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)  # IFD0 and the Exif IFD sit near the start of TIFF-based RAWs
        if head[:4] in (b"II*\x00", b"MM\x00*"):
            src = Image.Exif()
            src.load(head)
            for tag in _IFD0_TEXT:
                if isinstance(src.get(tag), str) and src[tag].strip():
                    e[tag] = src[tag].strip()
            sub = src.get_ifd(EXIF_IFD)
            if sub:
                e.get_ifd(EXIF_IFD).update({t: v for t, v in sub.items() if t in _RAW_EXIF_TAGS})
    except Exception as err:  # a directory Pillow cannot parse costs the EXIF, not the photo
        log.debug("%s: EXIF from the TIFF directory not read (%s)", path, err)
    o, lens, sub = raw.other, raw.lens, e.get_ifd(EXIF_IFD)
    fill = {0x829A: o.shutter_speed, 0x829D: o.aperture, 0x8827: int(o.iso_speed), 0x920A: o.focal_length,
            0xA433: lens.make.strip(), 0xA434: lens.model.strip()}
    if o.timestamp.year > 1970:
        fill[0x9003] = o.timestamp.strftime("%Y:%m:%d %H:%M:%S")
    for tag, v in fill.items():
        if v and tag not in sub:
            sub[tag] = v
    if o.artist.strip() and 0x013B not in e:
        e[0x013B] = o.artist.strip()
    return e.tobytes() if len(e) else None


# ExposureTime, FNumber, ExposureProgram, ISO, DateTimeOriginal, DateTimeDigitized, ExposureBias, MeteringMode,
# Flash, FocalLength, FocalLengthIn35mm, LensMake, LensModel, BodySerialNumber
_RAW_EXIF_TAGS = frozenset({0x829A, 0x829D, 0x8822, 0x8827, 0x9003, 0x9004, 0x9204, 0x9207, 0x9209, 0x920A,
                            0xA405, 0xA433, 0xA434, 0xA431})


# --- TIFF deeper than 8 bits -----------------------------------------------------------------------------------
def read_tiff(path: Path, meta: Metadata | None, orientation: int, max_megapixels: float = 0):
    """The first page of a 16-bit or float RGB(A)/gray TIFF as a 16-bit Picture (Pillow has no 16-bit RGB):
    uint16 as is, 32-bit integers by their top 16 bits, floats clipped to [0, 1] and scaled to 0..65535;
    `orientation` (EXIF 1–8, from the TIFF's own tag) applied once. `meta` None (a TIFF Pillow cannot open):
    the ICC profile, orientation and IFD0 EXIF are read here."""
    import tifffile

    from osediff.files.images import Picture, orient, refuse_size

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        refuse_size(path, page.imagewidth, page.imagelength, max_megapixels)
        if meta is None:
            icc = page.tags.get(34675)
            orientation = int(getattr(page.tags.get(274), "value", 1) or 1)
            meta = Metadata(icc=bytes(icc.value) if icc else None, exif=_tiff_exif(path))
        a = page.asarray()
        axes = page.axes
    if axes.startswith("S"):  # planar configuration 2: (S, Y, X)
        a = np.moveaxis(a, 0, -1)
    a = a[..., None] if a.ndim == 2 else a
    if a.dtype.kind == "f":
        a = np.rint(np.clip(np.nan_to_num(a.astype(np.float32)), 0, 1) * 65535).astype(np.uint16)
    elif a.dtype.itemsize == 4:
        a = (a.astype(np.uint32) >> 16).astype(np.uint16)
    elif a.dtype == np.uint8:
        a = a.astype(np.uint16) * 257
    a = orient(a.astype(np.uint16, copy=False), orientation)
    c = a.shape[2]
    color, alpha = (a[..., :-1], a[..., -1]) if c in (2, 4) else (a, None)
    gray = color.shape[2] == 1
    rgb = np.repeat(color, 3, axis=2) if gray else color[..., :3]
    return Picture(np.ascontiguousarray(rgb), None if alpha is None else np.ascontiguousarray(alpha), gray, meta)


def _tiff_exif(path: Path) -> bytes | None:
    """The EXIF-type tags of a TIFF's first directory (camera, date, Exif IFD), as EXIF bytes."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            src = Image.Exif()
            src.load(f.read(1 << 20))
        e = Image.Exif()
        for tag in (*_IFD0_TEXT, 0x0112):
            if tag in src:
                e[tag] = src[tag]
        sub = src.get_ifd(EXIF_IFD)
        if sub:
            e.get_ifd(EXIF_IFD).update(sub)
        return e.tobytes() if len(e) else None
    except Exception as err:  # costs the EXIF, not the picture
        log.debug("%s: EXIF not read (%s)", path, err)
        return None


def write_tiff16(tmp: str, planes: np.ndarray, meta: Metadata | None, exif: bytes | None) -> None:
    """(H, W, 1|2|3|4) uint16 -> a zlib-compressed 16-bit TIFF with the ICC profile (tag 34675), the DPI and
    the EXIF that fits IFD0 (camera, date, artist, ...; tifffile writes no Exif sub-directory)."""
    import tifffile
    from PIL import Image

    c = planes.shape[2]
    kw: dict = {"photometric": "minisblack" if c in (1, 2) else "rgb", "compression": "zlib", "metadata": None}
    if c in (2, 4):
        kw["extrasamples"] = ["unassalpha"]
    if meta and meta.icc:
        kw["iccprofile"] = meta.icc
    if meta and meta.dpi:
        kw["resolution"], kw["resolutionunit"] = meta.dpi, "INCH"
    tags = []
    if exif:
        e = Image.Exif()
        e.load(exif)
        for tag in _IFD0_TEXT:
            v = e.get(tag)
            if isinstance(v, str) and v and v.isascii():
                tags.append((tag, "s", 0, v, True))
        tags.append((0x0112, "H", 1, 1, True))  # orientation: the pixels are upright
    tifffile.imwrite(tmp, planes if c > 1 else planes[..., 0], extratags=tags, **kw)
