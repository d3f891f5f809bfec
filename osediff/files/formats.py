"""Which format a file holds, decided by its first bytes rather than its name, and which reader it needs.

An iPhone photo shared as `IMG_0001.jpg` is an HEIC inside; a `notes.txt` in a photo folder is no picture at
all. `identify` reads the signature (PNG, JPEG, GIF, WebP, TIFF, ISO-BMFF brands for HEIF/AVIF/CR3, JPEG XL,
the RAW-specific TIFF variants) and only then falls back to the name: camera RAW extensions go to LibRaw
(DNG, NEF, ARW... are TIFF inside, and their first directory is often a small preview that a TIFF reader would
take for the photo), then Pillow is asked to recognise the header, and a file whose name says "image" but whose
content nobody recognises is still an image candidate (a corrupt photo is a failure, never silently ignored).

The optional readers and the extra that installs each (`missing_reader`) live here too, so a folder scan can
say in one line what to `pip install` for a file it cannot read.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

# camera RAW: LibRaw reads all of these (the list plus Nikon NRW, Sony SRF/SR2, Leica RWL, Epson ERF)
RAW_EXTENSIONS = frozenset({".dng", ".cr2", ".cr3", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf",
                            ".rw2", ".pef", ".srw", ".rwl", ".erf"})
# names that say "picture" for the formats Pillow does not open by itself
EXTRA_EXTENSIONS = frozenset({".heic", ".heif", ".hif", ".avif", ".jxl"}) | RAW_EXTENSIONS
# ISO-BMFF `ftyp` brands (ISO/IEC 23008-12 for HEIF, AV1 Image File Format for AVIF, Canon CR3)
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_JXL_MAGIC = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")  # bare codestream / ISO-BMFF container

# kind -> (module that must import, extra that installs it); AVIF is Pillow's own codec (`avif_available`)
READERS = {"heif": ("pillow_heif", "heic"), "jxl": ("pillow_jxl", "jxl"), "raw": ("rawpy", "raw"),
           "tiff16": ("tifffile", "tiff")}
# what `--ext auto` writes for each kind (None: keep the input's own extension)
AUTO_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp", "tiff": None, "heif": "png", "avif": "png",
            "jxl": "png", "raw": "tiff"}


def sniff(head: bytes, suffix: str = "") -> str | None:
    """The kind a file's first bytes (>= 32 of them) say it is: "png", "jpeg", "gif", "webp", "tiff", "heif",
    "avif", "jxl", "raw", or None when the signature is not one of these. `suffix` (lower-case) only splits
    TIFF-based RAW (DNG, NEF, ARW, ...) from plain TIFF, which share a signature."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(_JXL_MAGIC):
        return "jxl"
    if head[4:8] == b"ftyp":
        size = int.from_bytes(head[:4], "big")
        major, brands = head[8:12], {head[i:i + 4] for i in range(16, min(size, len(head)) - 3, 4)}
        if major == b"crx ":
            return "raw"  # Canon CR3
        if major in _AVIF_BRANDS or (major not in _HEIF_BRANDS - {b"mif1", b"msf1"} and brands & _AVIF_BRANDS):
            return "avif"
        if major in _HEIF_BRANDS or brands & _HEIF_BRANDS:
            return "heif"
        return None
    if head[:4] in (b"IIRO", b"IIRS", b"MMOR", b"IIU\x00") or head.startswith(b"FUJIFILMCCD-RAW"):
        return "raw"  # Olympus ORF, Panasonic RW2, Fujifilm RAF
    if head[:4] in _TIFF_MAGIC:
        return "raw" if suffix in RAW_EXTENSIONS or head[8:10] == b"CR" else "tiff"  # CR2: "CR" after the header
    return None


def identify(path: Path) -> str | None:
    """The kind of `path` (see `sniff`; "pillow" for another format Pillow recognises or an image-named file
    nobody recognises, which then fails when read), or None for a file that is not a picture at all."""
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return None
    kind = sniff(head, suffix)
    if kind:
        return kind
    if suffix in RAW_EXTENSIONS:
        return "raw"  # LibRaw knows signatures (Sigma X3F, old Minolta MRW, ...) listed nowhere here
    if _pillow_recognises(path) or suffix in pillow_extensions() or suffix in EXTRA_EXTENSIONS:
        return "pillow"
    return None


def pillow_opens(path: Path) -> bool:
    """Whether Pillow recognises the header of `path` (nothing is decoded)."""
    return _pillow_recognises(path)


def _pillow_recognises(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):  # the header only; nothing is decoded
            return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False
    except Exception:  # a plugin's header parser tripping over random bytes: not a picture we know
        return False


@lru_cache(maxsize=1)
def pillow_extensions() -> frozenset[str]:
    """Lower-case suffixes of every format this Pillow opens (plus .png)."""
    from PIL import Image

    Image.init()
    return frozenset({e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN} | {".png"})


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def avif_available() -> bool:
    from PIL import features

    return bool(features.check("avif"))


def install_hint(kind: str) -> str:
    """The command that adds the reader/writer for `kind` ("heif", "jxl", "raw", "tiff16", "avif")."""
    if kind == "avif":
        return 'pip install -U pillow  (a Pillow with its AVIF codec: PIL.features.check("avif"))'
    return f'pip install "osediff[{READERS[kind][1]}]"'


def missing_reader(kind: str) -> str | None:
    """None when `kind` can be read here, else a sentence naming the missing package and its install line."""
    if kind == "avif":
        return None if avif_available() else f"this Pillow has no AVIF codec; {install_hint('avif')}"
    if kind in READERS and not has_module(READERS[kind][0]):
        return f"reading {kind.upper() if kind != 'tiff16' else '16-bit TIFF'} needs {READERS[kind][0]}: " \
               f"{install_hint(kind)}"
    return None


def auto_extension(src: Path) -> str:
    """What `--ext auto` writes for `src`: JPEG->jpg, PNG->png, WebP->webp, TIFF->its own extension,
    HEIC/AVIF/JXL->png, RAW->tiff; other formats keep their extension, and never a RAW one."""
    kind = identify(src)
    suffix = src.suffix.lower().lstrip(".")
    ext = AUTO_EXT.get(kind or "", suffix)
    if ext is None:
        ext = suffix if suffix in ("tif", "tiff") else "tiff"
    if f".{ext}" in RAW_EXTENSIONS or f".{ext}" in EXTRA_EXTENSIONS or not ext:
        return "png"
    return ext
