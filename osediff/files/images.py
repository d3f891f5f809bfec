"""Reading and writing image files: the only module that knows file formats (STYLE habit 5).

A file becomes a `Picture`: RGB pixels as uint8 or uint16 (H, W, 3), an optional alpha plane, EXIF orientation
applied, whether it was grayscale, and its `Metadata` (ICC, EXIF, text, DPI; `osediff.files.metadata`).
Grayscale, palette, CMYK and the like become RGB for the networks; a grayscale picture is written back as
grayscale (BT.601 luma). 16-bit PNGs (which Pillow reads as 8-bit) are read with pypng so 16-bit stays 16-bit.
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
from functools import lru_cache
from pathlib import Path

import numpy as np

from osediff.files.atomic import atomic_path
from osediff.files.metadata import (
    Metadata,
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


@lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """Lower-case suffixes of every format Pillow can open (plus .png, which 16-bit PNGs need pypng for): the
    one definition of "an image file" for folder listings in sr, eval, train and degrade."""
    from PIL import Image

    Image.init()
    return frozenset({e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN} | {".png"})


def is_image_file(path: Path) -> bool:
    """A regular, non-hidden file whose suffix is an image format (`image_extensions`)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in image_extensions()


class ImageReadError(ValueError):
    """A file that is not a readable image, or one refused as hostile; the message names it."""


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


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
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
    a = _orient(a, exif_orientation(meta.exif))
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

    from osediff.files.metadata import exif_for_output

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


def refuse_hostile(path: Path, im, max_megapixels: float) -> None:
    """Raise ImageReadError when the header of the opened (not decoded) `im` claims too many pixels: more
    than `max_megapixels` (0 = no limit), or for PNG more than the file's bytes could inflate to."""
    w, h = im.size
    mp = w * h / 1e6
    if w < 1 or h < 1:
        raise ImageReadError(f"refused {path}: the header says {w}x{h}")
    if max_megapixels and mp > max_megapixels:
        raise TooManyPixelsError(f"refused {path}: the header says {w}x{h} = {mp:.3g} megapixels, above "
                                 f"--max-input-megapixels {max_megapixels:g} (raise it to read this file)",
                                 (w, h), max_megapixels)
    if im.format == "PNG":
        need = h * (1 + (w + 7) // 8)  # the least inflated data: 1 bit per pixel plus a filter byte per row
        size = path.stat().st_size
        if need > DEFLATE_MAX_RATIO * size:
            raise ImageReadError(f"refused {path}: the header says {w}x{h}, but {size} bytes of PNG can hold "
                                 f"at most {DEFLATE_MAX_RATIO * size} bytes of pixels (needs {need}): a "
                                 f"decompression bomb or a broken file")


def read_image(path: str | os.PathLike, max_megapixels: float = DEFAULT_MAX_INPUT_MEGAPIXELS) -> Picture:
    """Read any Pillow-readable image (plus 16-bit PNG) as a Picture with its metadata. Anything wrong with
    the file (unreadable, truncated, hostile: `refuse_hostile`) raises ImageReadError naming it; a missing
    file raises FileNotFoundError."""
    from PIL import Image, ImageOps

    path = Path(path)
    try:
        with _pixel_limit_off(), Image.open(path) as im:
            refuse_hostile(path, im, max_megapixels)
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                log.warning("%s: %d frames; only the first is processed, the others are ignored", path, frames)
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
def write_image(path: str | os.PathLike, pic: Picture, quality: int = 95) -> None:
    """Write atomically (temporary file in the same folder, then rename), with `pic.meta` where the format
    can hold it (table in `osediff.files.metadata`). 16-bit is kept for PNG and reduced to 8-bit (with a
    warning) for formats that cannot hold it; alpha is dropped for JPEG (warning); gray stays gray."""
    from PIL import Image

    path = Path(path)
    ext = path.suffix.lower()
    if pic.bits == 16 and ext != ".png":
        log.warning("%s: %s cannot store 16 bits here; writing 8-bit", path.name, ext)
        pic = Picture((pic.rgb >> 8).astype(np.uint8), None if pic.alpha is None else (pic.alpha >> 8).astype(np.uint8),
                      pic.gray, pic.meta)
    if pic.alpha is not None and ext in (".jpg", ".jpeg"):
        log.warning("%s: JPEG has no alpha channel; dropping it", path.name)
        pic = Picture(pic.rgb, None, pic.gray, pic.meta)
    Image.init()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise ValueError(f"{path}: no image format has the extension {ext!r}")
    with atomic_path(path) as tmp:
        if pic.bits == 16:
            import io

            import png

            planes = _planes(pic)
            h, w, c = planes.shape
            writer = png.Writer(w, h, greyscale=c in (1, 2), alpha=pic.alpha is not None, bitdepth=16)
            buf = io.BytesIO()
            writer.write(buf, planes.reshape(h, w * c))
            Path(tmp).write_bytes(insert_after_ihdr(buf.getvalue(), png_chunks(pic.meta, pic.size)))
        else:
            kw = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
            im = to_pil(Picture(pic.rgb, pic.alpha, pic.gray))  # metadata below, by format
            kw.update(save_kwargs(pic.meta, fmt, pic.size))
            try:
                im.save(tmp, format=fmt, **kw)
            except OSError as e:  # e.g. BMP has no gray+alpha: the colour version, rather than nothing
                if not pic.gray or "mode" not in str(e):
                    raise
                log.warning("%s: %s cannot store mode %s; writing it as colour", path.name, fmt, im.mode)
                to_pil(Picture(pic.rgb, pic.alpha)).save(tmp, format=fmt, **kw)
