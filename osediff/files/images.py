"""Reading and writing image files: the only module that knows file formats (STYLE habit 5).

A file becomes a `Picture`: RGB pixels as uint8 or uint16 (H, W, 3), an optional alpha plane, EXIF orientation
applied. Grayscale, palette, CMYK and the like become RGB; 16-bit PNGs (which Pillow reads as 8-bit) are read
with pypng so 16-bit stays 16-bit. Writes go to a temporary name and are renamed, so an interrupted run never
leaves a partial image.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from osediff.files.atomic import atomic_path

log = logging.getLogger(__name__)


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
    """A file that is not a readable image; the message names it."""


@dataclass(frozen=True)
class Picture:
    rgb: np.ndarray  # (H, W, 3) uint8 or uint16
    alpha: np.ndarray | None = None  # (H, W), same dtype as rgb

    @property
    def bits(self) -> int:
        return 16 if self.rgb.dtype == np.uint16 else 8

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), PIL's convention."""
        return self.rgb.shape[1], self.rgb.shape[0]


def _png_bit_depth(path: Path) -> int | None:
    with open(path, "rb") as f:
        head = f.read(26)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or len(head) < 26:
        return None
    return head[24]


def _read_png16(path: Path) -> Picture:
    import png

    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    planes = info["planes"]
    a = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(height, width, planes)
    alpha = a[..., -1].copy() if info["alpha"] else None
    color = a[..., : planes - (1 if info["alpha"] else 0)]
    rgb = np.repeat(color, 3, axis=2) if color.shape[2] == 1 else color
    return Picture(np.ascontiguousarray(rgb), alpha)


def from_pil(im) -> Picture:
    """A decoded PIL image of any mode as a Picture: 16-bit grayscale stays 16-bit, alpha is split off,
    everything else (L, P, CMYK, YCbCr, 1, ...) becomes 8-bit RGB."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        g = np.clip(np.asarray(im, dtype=np.int64), 0, 65535).astype(np.uint16)
        return Picture(np.repeat(g[..., None], 3, axis=2))
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"))
        return Picture(np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3]))
    return Picture(np.asarray(im.convert("RGB")))


def to_pil(pic: Picture):
    """The Picture as a PIL image (RGB or RGBA; 16-bit pictures are reduced to 8-bit, which PIL can hold)."""
    from PIL import Image

    rgb, alpha = pic.rgb, pic.alpha
    if pic.bits == 16:
        rgb = (rgb >> 8).astype(np.uint8)
        alpha = None if alpha is None else (alpha >> 8).astype(np.uint8)
    if alpha is None:
        return Image.fromarray(rgb, "RGB")
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def read_image(path: str | os.PathLike) -> Picture:
    """Read any Pillow-readable image (plus 16-bit PNG) as a Picture; raises ImageReadError naming the file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        if _png_bit_depth(path) == 16:
            return _read_png16(path)
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here with its name
            return from_pil(ImageOps.exif_transpose(im))
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from e


def write_image(path: str | os.PathLike, pic: Picture, quality: int = 95) -> None:
    """Write atomically (temporary file in the same folder, then rename). 16-bit is kept for PNG and reduced
    to 8-bit (with a warning) for formats that cannot hold it; alpha is dropped for JPEG (warning)."""
    path = Path(path)
    ext = path.suffix.lower()
    if pic.bits == 16 and ext != ".png":
        log.warning("%s: %s cannot store 16-bit RGB here; writing 8-bit", path.name, ext)
        pic = Picture((pic.rgb >> 8).astype(np.uint8), None if pic.alpha is None else (pic.alpha >> 8).astype(np.uint8))
    if pic.alpha is not None and ext in (".jpg", ".jpeg"):
        log.warning("%s: JPEG has no alpha channel; dropping it", path.name)
        pic = Picture(pic.rgb)
    with atomic_path(path) as tmp:
        if pic.bits == 16:
            import png

            planes = pic.rgb if pic.alpha is None else np.dstack([pic.rgb, pic.alpha])
            h, w, c = planes.shape
            writer = png.Writer(w, h, greyscale=False, alpha=pic.alpha is not None, bitdepth=16)
            with open(tmp, "wb") as f:
                writer.write(f, planes.reshape(h, w * c))
        else:
            kw = {"quality": quality} if ext in (".jpg", ".jpeg", ".webp") else {}
            to_pil(pic).save(tmp, **kw)
