"""What a photo carries besides its pixels, read from one file and written into another format.

`Metadata` holds the colour profile (ICC), EXIF, PNG text chunks and the resolution (DPI) of an input. Written
out, EXIF gets orientation 1 (the reader already rotated the pixels), the new pixel dimensions, and loses the
TIFF image-structure tags (strip offsets, bit depth, ...) that describe the old file rather than the photo.
DPI is carried unchanged (as an image editor does when it resamples: the print gets larger, not denser).

What each output format keeps (Pillow's writers; 16-bit PNGs are written by pypng plus the chunks below):

| format | ICC | EXIF | text chunks | DPI |
|---|---|---|---|---|
| PNG  | iCCP | eXIf | tEXt/iTXt | pHYs |
| JPEG | APP2 | APP1 | — | JFIF density |
| WebP | ICCP | EXIF | — | — |
| TIFF | tag 34675 | IFD0 + Exif IFD tags | — | X/YResolution |
| TIFF 16-bit (tifffile) | tag 34675 | IFD0 text tags only (`osediff.files.extras.write_tiff16`) | — | X/YResolution |
| HEIC, AVIF, JPEG XL | colr box (JXL: libjxl's own profile of it) | Exif item/box | — | — |
| others (GIF, BMP, ...) | — | — | — | — |

XMP and legacy "Raw profile type ..." text (ImageMagick's hex copies of EXIF/IPTC) are not carried: they
repeat the orientation and size, which would then contradict the new pixels.
"""

from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass

log = logging.getLogger(__name__)

ORIENTATION, EXIF_IFD = 0x0112, 0x8769
PIXEL_X, PIXEL_Y = 0xA002, 0xA003  # PixelXDimension / PixelYDimension in the Exif IFD
# TIFF tags that describe the file's pixel layout, not the photo (TIFF 6.0 baseline + tiles + ICC/XMP/IPTC,
# which travel separately or not at all); a TIFF's getexif() returns them next to Make/Model.
_STRUCTURE_TAGS = frozenset({254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281, 282, 283,
                             284, 296, 317, 320, 322, 323, 324, 325, 338, 339, 340, 341, 530, 531, 532, 700,
                             33723, 34675})
_DROPPED_TEXT = ("XML:com.adobe.xmp", "Raw profile type")
_FORMATS_WITH = {"icc": {"PNG", "JPEG", "WEBP", "TIFF", "HEIF", "AVIF", "JXL"},
                 "exif": {"PNG", "JPEG", "WEBP", "TIFF", "HEIF", "AVIF", "JXL"},
                 "dpi": {"PNG", "JPEG", "TIFF"}, "text": {"PNG"}}


@dataclass(frozen=True)
class Metadata:
    icc: bytes | None = None  # the ICC profile, byte for byte
    exif: bytes | None = None  # raw EXIF as read (b"Exif\0\0" + TIFF structure), orientation not yet reset
    text: tuple[tuple[str, str], ...] = ()  # PNG text chunks (key, value)
    dpi: tuple[float, float] | None = None
    upright: bool = True  # the pixels were rotated by the EXIF orientation (files); False: left as given (API)

    def __bool__(self) -> bool:
        return bool(self.icc or self.exif or self.text or self.dpi)


def read_metadata(im) -> Metadata:
    """The metadata of an opened (and loaded) PIL image; whatever cannot be read is left out with a warning,
    never failing the file for it."""
    icc = im.info.get("icc_profile") or None
    exif = None
    try:
        e = im.getexif()
        if len(e):
            exif = e.tobytes()
    except Exception as err:  # a malformed EXIF block costs the EXIF, not the photo
        log.warning("%s: EXIF not readable, not carried (%s)", getattr(im, "filename", "image"), err)
    text: tuple[tuple[str, str], ...] = ()
    if im.format == "PNG":
        text = tuple((k, str(v)) for k, v in getattr(im, "text", {}).items()
                     if not k.startswith(_DROPPED_TEXT) and 0 < len(k) < 80)
    dpi = im.info.get("dpi")
    dpi = (float(dpi[0]), float(dpi[1])) if dpi and len(dpi) == 2 and min(dpi) > 0 else None
    return Metadata(icc if isinstance(icc, bytes) else None, exif, text, dpi)


def exif_orientation(exif: bytes | None) -> int:
    """The EXIF orientation (1–8; 1 when absent or unreadable)."""
    if not exif:
        return 1
    from PIL import Image

    try:
        e = Image.Exif()
        e.load(exif)
        o = int(e.get(ORIENTATION, 1))
    except Exception:
        return 1
    return o if 1 <= o <= 8 else 1


def exif_for_output(exif: bytes, size: tuple[int, int], upright: bool = True) -> bytes | None:
    """EXIF for a new image of `size` (w, h): orientation 1 when `upright` (kept otherwise),
    PixelX/YDimension = size when present, TIFF structure tags dropped. None when nothing is left, or (with a warning) when Pillow cannot re-serialise it."""
    from PIL import Image

    try:
        e = Image.Exif()
        e.load(exif)
        for tag in [t for t in e if t in _STRUCTURE_TAGS]:
            del e[tag]
        if ORIENTATION in e and upright:
            e[ORIENTATION] = 1
        if EXIF_IFD in e:  # (get_ifd would add an empty Exif IFD otherwise)
            sub = e.get_ifd(EXIF_IFD)
            if PIXEL_X in sub:
                sub[PIXEL_X] = size[0]
            if PIXEL_Y in sub:
                sub[PIXEL_Y] = size[1]
        return e.tobytes() if len(e) else None
    except Exception as err:
        log.warning("EXIF could not be rewritten; not carried (%s)", err)
        return None


def save_kwargs(meta: Metadata | None, fmt: str, size: tuple[int, int]) -> dict:
    """Keyword arguments for PIL's `save` in format `fmt` ("PNG", "JPEG", ...) carrying `meta`."""
    if not meta:
        return {}
    kw: dict = {}
    if meta.icc and fmt in _FORMATS_WITH["icc"]:
        kw["icc_profile"] = meta.icc
    if meta.exif and fmt in _FORMATS_WITH["exif"]:
        exif = exif_for_output(meta.exif, size, meta.upright)
        if exif:
            kw["exif"] = exif
    if meta.dpi and fmt in _FORMATS_WITH["dpi"]:
        kw["dpi"] = meta.dpi
    if meta.text and fmt in _FORMATS_WITH["text"]:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for k, v in meta.text:
            info.add_text(k, v)  # iTXt when the value is not Latin-1
        kw["pnginfo"] = info
    return kw


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_chunks(meta: Metadata | None, size: tuple[int, int]) -> bytes:
    """The PNG chunks (iCCP, eXIf, pHYs, tEXt/iTXt) for `meta`, serialised, for writers without metadata
    support (pypng, which writes our 16-bit PNGs). PNG spec §11.3."""
    if not meta:
        return b""
    out = b""
    if meta.icc:
        out += _chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(meta.icc))
    exif = exif_for_output(meta.exif, size, meta.upright) if meta.exif else None
    if exif:
        out += _chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif)
    if meta.dpi:
        out += _chunk(b"pHYs", struct.pack(">IIB", round(meta.dpi[0] / 0.0254), round(meta.dpi[1] / 0.0254), 1))
    for k, v in meta.text:
        try:
            out += _chunk(b"tEXt", k.encode("latin-1") + b"\x00" + v.encode("latin-1"))
        except UnicodeEncodeError:
            out += _chunk(b"iTXt", k.encode("utf-8") + b"\x00\x00\x00\x00\x00" + v.encode("utf-8"))
    return out


def insert_after_ihdr(png: bytes, chunks: bytes) -> bytes:
    """A PNG file with `chunks` placed right after IHDR (where iCCP must be: before PLTE and IDAT)."""
    end = 8 + 8 + 13 + 4  # signature, IHDR length+type, IHDR data, CRC
    if png[12:16] != b"IHDR":
        raise ValueError("not a PNG stream")
    return png[:end] + chunks + png[end:]
