"""Reading and writing image files: the only module that knows file formats (STYLE habit 5).

A file becomes a `Picture`: RGB pixels as uint8 or uint16 (H, W, 3), an optional alpha plane, EXIF orientation
applied, whether it was grayscale, and its `Metadata` (ICC, EXIF, text, DPI; `osediff.files.metadata`).
Grayscale, palette, CMYK and the like become RGB for the networks; a grayscale picture is written back as
grayscale (BT.601 luma). 16-bit PNGs (which Pillow reads as 8-bit) are read with pypng so 16-bit stays 16-bit.
The format is told by content (`osediff.files.formats`); HEIC, JPEG XL, camera RAW and 16-bit/float TIFF go
through the optional libraries of `osediff.files.extras` (10/12-bit HEIC and RAW become 16-bit pictures).
Writes go to a temporary name and are renamed, so an interrupted run never leaves a partial image.

Hostile files are refused from the header, before any pixel is decoded: more than `max_megapixels` pixels,
or (PNG) more pixels than the file's compressed bytes could possibly expand to. Of a multi-frame file
(animated GIF/WebP/PNG, multi-page TIFF) the first frame is read and a warning says the others were ignored.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from osediff.files.atomic import atomic_path
from osediff.files.metadata import (
    Metadata,
    exif_for_output,
    exif_orientation,
    insert_after_ihdr,
    png_chunks,
    read_metadata,
    save_kwargs,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_INPUT_MEGAPIXELS = 150.0  # a 100-MP medium-format photo passes; Pillow itself refuses 179 MP
DEFLATE_MAX_RATIO = 1032  # deflate cannot expand one byte into more than ~1032 (258-byte matches, 2 bits each)
GRAY_MODES = ("L", "LA", "La", "1", "I;16", "I;16B", "I;16L", "I")


def image_extensions() -> frozenset[str]:
    """Lower-case suffixes that name a picture: every format Pillow opens, plus .png, HEIC/HEIF, AVIF, JPEG XL
    and camera RAW (read through the optional extras; `osediff.files.formats`)."""
    from osediff.files.formats import EXTRA_EXTENSIONS, pillow_extensions

    return pillow_extensions() | EXTRA_EXTENSIONS


def is_image_file(path: Path) -> bool:
    """A regular, non-hidden file whose content (or, failing that, name) says it is a picture
    (`osediff.files.formats.identify`): an HEIC named .jpg is one, a notes.txt is not. The one definition of
    "an image file" for folder listings in sr, eval, train, degrade and the web page."""
    from osediff.files.formats import identify

    return path.is_file() and not path.name.startswith(".") and identify(path) is not None


class ImageReadError(ValueError):
    """A file that is not a readable image, or one refused as hostile; the message names it."""


class MissingReaderError(ImageReadError):
    """A picture whose format needs an optional package that is not installed; the message says which
    `pip install "osediff[...]"` adds it."""


class TooManyPixelsError(ImageReadError):
    """Refused from the header: it claims `size` (W, H), more than `limit` megapixels."""

    def __init__(self, message: str, size: tuple[int, int], limit: float):
        super().__init__(message)
        self.size, self.limit = size, limit


@dataclass(frozen=True)
class Picture:
    rgb: np.ndarray  # (H, W, 3) uint8 or uint16
    alpha: np.ndarray | None = None  # (H, W), same dtype as rgb
    gray: bool = False  # a grayscale image: the networks see RGB, files get the BT.601 luma of rgb
    meta: Metadata | None = None  # carried into the output file (None: nothing)

    @property
    def bits(self) -> int:
        return 16 if self.rgb.dtype == np.uint16 else 8

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), PIL's convention."""
        return self.rgb.shape[1], self.rgb.shape[0]


def luma601(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8/uint16 -> (H, W) same dtype: Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601), rounded;
    the weights Pillow's convert("L") and OpenCV's RGB2GRAY use."""
    y = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.clip(np.rint(y), 0, np.iinfo(rgb.dtype).max).astype(rgb.dtype)


def _planes(pic: Picture) -> np.ndarray:
    """The channels a file stores: (H, W, 1|2|3|4) = gray / gray+alpha / RGB / RGBA."""
    color = luma601(pic.rgb)[..., None] if pic.gray else pic.rgb
    return color if pic.alpha is None else np.dstack([color, pic.alpha])


# --- reading ------------------------------------------------------------------------------------------------
def _png_bit_depth(path: Path) -> int | None:
    with open(path, "rb") as f:
        head = f.read(26)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or len(head) < 26:
        return None
    return head[24]


def orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1–8) to (H, W, ...) pixels, as ImageOps.exif_transpose does."""
    ops = {2: lambda x: x[:, ::-1], 3: lambda x: x[::-1, ::-1], 4: lambda x: x[::-1],
           5: lambda x: x.swapaxes(0, 1), 6: lambda x: np.rot90(x, -1), 7: lambda x: np.rot90(x, 1)[::-1],
           8: lambda x: np.rot90(x, 1)}
    return np.ascontiguousarray(ops[orientation](a)) if orientation in ops else a


def _read_png16(path: Path, meta: Metadata) -> Picture:
    import png

    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    planes = info["planes"]
    a = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(height, width, planes)
    a = orient(a, exif_orientation(meta.exif))
    alpha = a[..., -1].copy() if info["alpha"] else None
    color = a[..., : planes - (1 if info["alpha"] else 0)]
    gray = color.shape[2] == 1
    rgb = np.repeat(color, 3, axis=2) if gray else color
    return Picture(np.ascontiguousarray(rgb), alpha, gray, meta)


def from_pil(im, meta: Metadata | None = None) -> Picture:
    """A decoded PIL image of any mode as a Picture: 16-bit grayscale stays 16-bit, alpha is split off,
    everything else (P, CMYK, YCbCr, ...) becomes 8-bit RGB; L, LA, 1 and I;16 are marked `gray`."""
    gray = im.mode in GRAY_MODES
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        g = np.clip(np.asarray(im, dtype=np.int64), 0, 65535).astype(np.uint16)
        return Picture(np.repeat(g[..., None], 3, axis=2), None, True, meta)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"))
        return Picture(np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3]), gray, meta)
    return Picture(np.asarray(im.convert("RGB")), None, gray, meta)


def to_pil(pic: Picture):
    """The Picture as a PIL image: L/LA for gray pictures, else RGB/RGBA; 16-bit is reduced to 8-bit, which
    PIL can hold. The metadata goes into `info` (icc_profile, exif, dpi), where PIL's PNG/JPEG writers find it."""
    from PIL import Image

    a = _planes(pic)
    if pic.bits == 16:
        a = (a >> 8).astype(np.uint8)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[a.shape[2]]
    im = Image.fromarray(a[..., 0] if mode == "L" else a, mode)
    m = pic.meta
    if m:
        if m.icc:
            im.info["icc_profile"] = m.icc
        if m.dpi:
            im.info["dpi"] = m.dpi
        exif = exif_for_output(m.exif, pic.size, m.upright) if m.exif else None
        if exif:
            im.info["exif"] = exif
    return im


@contextlib.contextmanager
def _pixel_limit_off():
    """Pillow's own bomb check (warn above 89 MP, refuse above 179 MP, a process-wide setting) is replaced
    by ours, which has a user-set limit and a message naming the flag; restored afterwards."""
    import warnings

    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def refuse_size(path: Path, w: int, h: int, max_megapixels: float) -> None:
    """Raise ImageReadError when a header's w x h is empty or more than `max_megapixels` (0 = no limit)."""
    mp = w * h / 1e6
    if w < 1 or h < 1:
        raise ImageReadError(f"refused {path}: the header says {w}x{h}")
    if max_megapixels and mp > max_megapixels:
        raise TooManyPixelsError(f"refused {path}: the header says {w}x{h} = {mp:.3g} megapixels, above "
                                 f"--max-input-megapixels {max_megapixels:g} (raise it to read this file)",
                                 (w, h), max_megapixels)


def refuse_hostile(path: Path, im, max_megapixels: float) -> None:
    """Raise ImageReadError when the header of the opened (not decoded) `im` claims too many pixels: more
    than `max_megapixels` (0 = no limit), or for PNG more than the file's bytes could inflate to."""
    w, h = im.size
    refuse_size(path, w, h, max_megapixels)
    if im.format == "PNG":
        need = h * (1 + (w + 7) // 8)  # the least inflated data: 1 bit per pixel plus a filter byte per row
        size = path.stat().st_size
        if need > DEFLATE_MAX_RATIO * size:
            raise ImageReadError(f"refused {path}: the header says {w}x{h}, but {size} bytes of PNG can hold "
                                 f"at most {DEFLATE_MAX_RATIO * size} bytes of pixels (needs {need}): a "
                                 f"decompression bomb or a broken file")


def _tiff_needs_tifffile(im) -> bool:
    """An opened TIFF that Pillow would flatten: colour with more than 8 bits per sample, or floating point."""
    tags = getattr(im, "tag_v2", {})
    bits = tags.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    fmt = tags.get(339, (1,))
    fmt = fmt if isinstance(fmt, tuple) else (fmt,)
    return 3 in fmt or (max(bits) > 8 and tags.get(277, 1) >= 3)


def read_image(path: str | os.PathLike, max_megapixels: float = DEFAULT_MAX_INPUT_MEGAPIXELS) -> Picture:
    """Read a picture file as a Picture with its metadata, the format told by its content
    (`osediff.files.formats.identify`): whatever Pillow opens, 16-bit PNG (pypng), and with the optional
    extras HEIC/HEIF (10/12-bit at full depth), JPEG XL, camera RAW and 16-bit/float TIFF (`osediff.files.extras`);
    AVIF through Pillow's own codec. EXIF orientation is applied once, for every format. Anything wrong with
    the file (unreadable, truncated, hostile: `refuse_hostile`) raises ImageReadError naming it, a format whose
    reader is not installed MissingReaderError with the install line; a missing file FileNotFoundError."""
    from PIL import Image, ImageOps

    from osediff.files import extras, formats
    from osediff.files.formats import identify, missing_reader

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    kind = identify(path) or "pillow"  # a named file is tried even when nothing recognises it
    missing = missing_reader(kind)
    if missing:
        raise MissingReaderError(f"cannot read {path}: {missing}")
    try:
        if kind == "raw":
            return extras.read_raw(path, max_megapixels)
        if kind in ("heif", "jxl"):
            extras.register(kind)
        if kind == "tiff" and not formats.pillow_opens(path):  # e.g. float RGB, which Pillow has no mode for
            missing = missing_reader("tiff16")
            if missing:
                raise MissingReaderError(f"cannot read {path}: {missing}")
            return extras.read_tiff(path, None, 1, max_megapixels)
        with _pixel_limit_off(), Image.open(path) as im:
            refuse_hostile(path, im, max_megapixels)
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                log.warning("%s: %d frames; only the first is processed, the others are ignored", path, frames)
            if kind == "heif" and im.info.get("bit_depth", 8) > 8:
                return extras.read_heif_deep(path, read_metadata(im), im.info["bit_depth"])
            if im.format == "TIFF" and _tiff_needs_tifffile(im):
                missing = missing_reader("tiff16")
                if missing:
                    raise MissingReaderError(f"cannot read {path} at its depth: {missing}")
                meta = read_metadata(im)
                return extras.read_tiff(path, meta, exif_orientation(meta.exif), max_megapixels)
            im.load()  # decode now (the first frame), so a truncated file fails here with its name
            meta = read_metadata(im)
            if im.format == "PNG" and _png_bit_depth(path) == 16:
                return _read_png16(path, meta)
            try:
                upright = ImageOps.exif_transpose(im)
            except Exception as e:  # a malformed EXIF block costs the rotation, not the photo
                log.warning("%s: EXIF orientation not applied (%s)", path, e)
                upright = im
            return from_pil(upright, meta)
    except (FileNotFoundError, ImageReadError):
        raise
    except Exception as e:  # whatever a hostile file makes a decoder raise is this file's failure
        raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


# --- writing ------------------------------------------------------------------------------------------------
_HEIF_EXTS, _TIFF_EXTS = (".heic", ".heif", ".hif"), (".tif", ".tiff")


def _writer_ready(path: Path, ext: str) -> None:
    """Register the optional Pillow plugin an extension needs, or raise ValueError with the install line."""
    from osediff.files import extras
    from osediff.files.formats import avif_available, has_module, install_hint

    if ext in _HEIF_EXTS or ext == ".jxl":
        kind, module = ("heif", "pillow_heif") if ext in _HEIF_EXTS else ("jxl", "pillow_jxl")
        if not has_module(module):
            raise ValueError(f"{path}: writing {ext} needs {module}: {install_hint(kind)}")
        extras.register(kind)
    elif ext == ".avif" and not avif_available():
        raise ValueError(f"{path}: this Pillow has no AVIF codec; {install_hint('avif')}")


def _to8(pic: Picture) -> Picture:
    return Picture((pic.rgb >> 8).astype(np.uint8),
                   None if pic.alpha is None else (pic.alpha >> 8).astype(np.uint8), pic.gray, pic.meta)


def write_image(path: str | os.PathLike, pic: Picture, quality: int = 95) -> None:
    """Write atomically (temporary file in the same folder, then rename), with `pic.meta` where the format
    can hold it (table in `osediff.files.metadata`). 16 bits are kept in PNG (pypng), TIFF (tifffile, with the
    `tiff` extra) and HEIC (10-bit, pillow-heif); other formats get 8 bits with a warning. JPEG is written
    4:4:4 at `quality`; alpha is dropped for JPEG (warning); gray stays gray."""
    from PIL import Image

    from osediff.files.formats import RAW_EXTENSIONS, has_module, install_hint

    path = Path(path)
    ext = path.suffix.lower()
    if ext in RAW_EXTENSIONS:
        raise ValueError(f"{path}: camera RAW is read only, never written; use --ext tiff for 16 bits")
    _writer_ready(path, ext)
    deep = ext == ".png" or ext in _HEIF_EXTS or (ext in _TIFF_EXTS and has_module("tifffile"))
    if pic.bits == 16 and not deep:
        hint = f" (16-bit TIFF needs tifffile: {install_hint('tiff16')})" if ext in _TIFF_EXTS else ""
        log.warning("%s: %s cannot store 16 bits here; writing 8-bit%s", path.name, ext, hint)
        pic = _to8(pic)
    if pic.alpha is not None and ext in (".jpg", ".jpeg"):
        log.warning("%s: JPEG has no alpha channel; dropping it", path.name)
        pic = Picture(pic.rgb, None, pic.gray, pic.meta)
    Image.init()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise ValueError(f"{path}: no image format has the extension {ext!r}")
    with atomic_path(path) as tmp:
        if pic.bits == 16 and ext == ".png":
            import io

            import png

            planes = _planes(pic)
            h, w, c = planes.shape
            writer = png.Writer(w, h, greyscale=c in (1, 2), alpha=pic.alpha is not None, bitdepth=16)
            buf = io.BytesIO()
            writer.write(buf, planes.reshape(h, w * c))
            Path(tmp).write_bytes(insert_after_ihdr(buf.getvalue(), png_chunks(pic.meta, pic.size)))
        elif pic.bits == 16 and ext in _TIFF_EXTS:
            from osediff.files import extras

            m = pic.meta
            exif = exif_for_output(m.exif, pic.size, m.upright) if m and m.exif else None
            extras.write_tiff16(tmp, _planes(pic), m, exif)
        elif pic.bits == 16:  # HEIC: pillow-heif keeps 10 bits of it
            from osediff.files import extras

            planes = pic.rgb if pic.alpha is None else np.dstack([pic.rgb, pic.alpha])  # HEIC has no gray mode
            extras.write_heif(tmp, planes, save_kwargs(pic.meta, "HEIF", pic.size), quality)
        else:
            kw = {"quality": quality} if fmt in ("JPEG", "WEBP", "HEIF", "AVIF", "JXL") else {}
            if fmt == "JPEG":
                kw["subsampling"] = 0  # 4:4:4: halving the chroma of a super-resolved photo undoes detail
            im = to_pil(Picture(pic.rgb, pic.alpha, pic.gray))  # metadata below, by format
            if fmt in ("HEIF", "AVIF") and im.mode in ("L", "LA"):
                im = im.convert("RGBA" if im.mode == "LA" else "RGB")  # (their writers take colour only)
            kw.update(save_kwargs(pic.meta, fmt, pic.size))
            try:
                im.save(tmp, format=fmt, **kw)
            except OSError as e:  # e.g. BMP has no gray+alpha: the colour version, rather than nothing
                if not pic.gray or "mode" not in str(e):
                    raise
                log.warning("%s: %s cannot store mode %s; writing it as colour", path.name, fmt, im.mode)
                to_pil(Picture(pic.rgb, pic.alpha)).save(tmp, format=fmt, **kw)
