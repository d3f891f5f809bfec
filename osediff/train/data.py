"""Training images (spec §4.2, §4.7): sources -> checked path list -> seeded crops, in a resumable order.

    sources   folders (recursive) and .txt lists, each repeated `repeats[i]` times        spec §4.2
    scan      header-only check: unreadable files and images smaller than the crop are
              counted and skipped with one warning (the reference crashes on both)
    order     `EpochSampler`: a seeded permutation per epoch, padded to whole global batches,
              yielding (index, sample seed) so crops do not depend on workers or processes
    sample    `TrainImages[(index, seed)]`: decode -> random crop + flip (or, for faces, resize to
              crop² + flips + transposition) -> (3, crop, crop) float in [0, 1]

The degradation is not done here: it runs batched on the training device (`osediff.degradation.realesrgan`). The
reference flips twice (`RandomHorizontalFlip`, then basicsr's `augment` inside the degradation); two independent
p=0.5 flips are one p=0.5 flip, which is what we draw.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from osediff.files.images import ImageReadError, is_image_file, read_image

log = logging.getLogger(__name__)



def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, stable across runs, processes and platforms."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ------------------------------------------------------------------------------------------------- sources

def list_source(source: str | os.PathLike) -> list[str]:
    """Image paths of one source: a folder (recursive, sorted) or a .txt list (one path per line; blank lines
    and '#' comments skipped; relative paths are relative to the list's folder)."""
    p = Path(source).expanduser()
    if p.is_dir():
        return sorted(str(f) for f in p.rglob("*") if is_image_file(f))
    if p.is_file():
        out = []
        for line in p.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                q = Path(line).expanduser()
                out.append(str(q if q.is_absolute() else p.parent / q))
        return out
    raise FileNotFoundError(f"training data source not found: {p} (expected a folder or a .txt list of images)")


def gather_paths(sources: Sequence[str], repeats: Sequence[int] = ()) -> list[str]:
    """All sources concatenated, source i repeated repeats[i] times (default 1)."""
    paths: list[str] = []
    for i, src in enumerate(sources):
        found = list_source(src)
        if not found:
            log.warning("no images in %s", src)
        paths += found * (repeats[i] if repeats else 1)
    return paths


def _header_size(path: str) -> tuple[int, int] | str:
    """(width, height) from the file header, or the reason it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:  # unreadable, missing, not an image: all skipped the same way
        return f"{type(e).__name__}: {e}"


def scan_images(paths: Sequence[str], min_side: int, threads: int = 8) -> list[str]:
    """Keep the paths whose header reads and whose shorter side is at least `min_side` (0: any size).

    Skipped files are counted and reported in one warning, never an exception; repeated paths are read once.
    Files that pass the header check but fail to decode are handled when loaded (`TrainImages`).
    """
    unique = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(threads) as pool:
        info = dict(zip(unique, pool.map(_header_size, unique)))
    unreadable = {p: r for p, r in info.items() if isinstance(r, str)}
    small = {p: s for p, s in info.items() if not isinstance(s, str) and min(s) < min_side}
    if unreadable or small:
        parts = []
        if small:
            p, (w, h) = next(iter(small.items()))
            parts.append(f"{len(small)} smaller than the {min_side}-pixel crop (e.g. {p}: {w}x{h})")
        if unreadable:
            p, why = next(iter(unreadable.items()))
            parts.append(f"{len(unreadable)} unreadable (e.g. {p}: {why})")
        log.warning("skipping %d of %d training images: %s", len(small) + len(unreadable), len(unique),
                    "; ".join(parts))
    return [p for p in paths if p not in unreadable and p not in small]


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """Captions file: a JSON object {image: caption}, or text lines 'image<TAB>caption'."""
    p = Path(path)
    text = p.read_text()
    if p.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a JSON object mapping images to captions")
        return {str(k): str(v) for k, v in data.items()}
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise ValueError(f"{p}:{n}: expected 'image<TAB>caption'")
        key, caption = line.split("\t", 1)
        out[key.strip()] = caption.strip()
    return out


def caption_for(captions: dict[str, str], path: str) -> str | None:
    """The caption of `path`, looked up by the path as listed, then its file name, then its stem."""
    p = Path(path)
    for key in (path, p.name, p.stem):
        if key in captions:
            return captions[key]
    return None


# --------------------------------------------------------------------------------------------- transforms

def random_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size×size window of (H, W, C), uniformly placed (torchvision RandomCrop without padding)."""
    h, w = img.shape[:2]
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return img[top:top + size, left:left + size]


def random_flips(img: np.ndarray, rng: np.random.Generator, vflip_transpose: bool) -> np.ndarray:
    """Horizontal flip with p 0.5; with `vflip_transpose` also a vertical flip and an H/W transposition, each
    with p 0.5 (basicsr `augment(hflip=True, rotation=True)`, the face variant, spec §4.7 step 3)."""
    draws = rng.random(3)
    if draws[0] < 0.5:
        img = img[:, ::-1]
    if vflip_transpose:
        if draws[1] < 0.5:
            img = img[::-1]
        if draws[2] < 0.5:
            img = img.transpose(1, 0, 2)
    return img


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8/uint16 -> (3, H, W) float32 in [0, 1]."""
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    return torch.from_numpy(np.ascontiguousarray(img).astype(np.float32) / scale).permute(2, 0, 1).contiguous()


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """PIL LANCZOS resize of (H, W, 3) to exactly size×size (the face variant, spec §4.7 step 1)."""
    from PIL import Image

    if img.shape[:2] == (size, size):
        return img
    if img.dtype == np.uint16:  # PIL has no 16-bit RGB: resize each channel as a 32-bit float plane
        planes = [np.asarray(Image.fromarray(img[..., c].astype(np.float32), "F").resize((size, size),
                                                                                        Image.LANCZOS))
                  for c in range(3)]
        return np.clip(np.stack(planes, -1).round(), 0, 65535).astype(np.uint16)
    return np.asarray(Image.fromarray(img, "RGB").resize((size, size), Image.LANCZOS))


# ---------------------------------------------------------------------------------------- dataset, sampler

class TrainImages(Dataset):
    """HQ training crops. Key: (index, sample seed) from `EpochSampler`; item: {"hq": (3, crop, crop) float32
    in [0, 1], "path": str}.

    A file that fails to decode (it passed the header scan) is replaced by the next index, with a warning once
    per file, so one bad file never stops a run.
    """

    def __init__(self, paths: Sequence[str], crop: int, face: bool = False):
        if not paths:
            raise ValueError("no usable training images")
        self.paths, self.crop, self.face = list(paths), crop, face
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        rng = np.random.default_rng(seed)
        for k in range(len(self.paths)):
            path = self.paths[(index + k) % len(self.paths)]
            try:
                rgb = read_image(path).rgb
            except (ImageReadError, OSError) as e:
                self._skip(path, str(e))
                continue
            if self.face:
                img = random_flips(resize_square(rgb, self.crop), rng, vflip_transpose=True)
            elif min(rgb.shape[:2]) < self.crop:
                self._skip(path, f"{rgb.shape[1]}x{rgb.shape[0]} is smaller than the {self.crop} crop")
                continue
            else:
                img = random_flips(random_crop(rgb, self.crop, rng), rng, vflip_transpose=False)
            return {"hq": to_tensor(img), "path": path}
        raise RuntimeError("none of the training images could be read")

    def _skip(self, path: str, why: str) -> None:
        if path not in self._warned:
            self._warned.add(path)
            log.warning("skipping training image %s (%s)", path, why)


class EpochSampler(Sampler):
    """Yields (index, sample seed) pairs: per epoch a permutation seeded by (seed, epoch), extended by wrapping
    around to a whole number of global batches, so accelerate's per-process sharding never pads on its own.

    `resume(epoch, position)` starts the next iteration at `position` of that epoch's sequence: a resumed run
    sees exactly the samples a straight run would have, without decoding the skipped ones.
    """

    def __init__(self, num_items: int, global_batch: int, seed: int):
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.epoch, self.position = 0, 0

    @property
    def epoch_length(self) -> int:
        """Samples per epoch, all processes together: len(dataset) rounded up to whole global batches."""
        return -(-self.num_items // self.global_batch) * self.global_batch

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate's data loader before each pass; a new epoch starts from its beginning."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def resume(self, epoch: int, position: int) -> None:
        self.epoch = epoch
        self.position = position - position % self.global_batch

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
        perm = torch.randperm(self.num_items, generator=g).tolist()
        return [perm[i % self.num_items] for i in range(self.epoch_length)]

    def __len__(self) -> int:
        return self.epoch_length - self.position

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.order(self.epoch)
        for pos in range(self.position, self.epoch_length):
            yield order[pos], derive_seed(self.seed, "sample", self.epoch, pos)
