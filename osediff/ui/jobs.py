"""What the web page asks of the pipeline, without the page: one upscale job, its checks, stages and files.

`Runner` holds the loaded pipeline and runs one job at a time on its device (a lock, so a cancelled job that
is still unwinding and the next one never share the device). A job reads the uploaded file through
`osediff.files.images` (the same reader as `osediff sr`), refuses what the page should not process (no image,
an empty or broken file, more than `max_megapixels`), runs `OSEDiffPipeline.run_picture` with the page's
options and tags, and writes the exact result: a lossless PNG (16-bit when the input was, alpha kept) into
the job's folder, which lies inside Gradio's temporary folder. Gradio is not imported here.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

STAGE_LABEL = {"read": "reading the image", "tags": "reading tags (DAPE)", "encode": "VAE encode",
               "unet": "UNet", "decode": "VAE decode", "color_fix": "colour fix"}


# formats a browser's <img> cannot show: the page shows the developed picture beside the upload
BROWSER_CANNOT_SHOW = frozenset({"heif", "raw", "jxl", "tiff"})


class JobError(ValueError):
    """A problem with the user's input, said in one line for the page."""


class Cancelled(Exception):
    """The user cancelled the running job."""


@dataclass(frozen=True)
class JobOptions:
    """The page's controls: `tags` None lets DAPE read them; a string (even empty) is used as the tags."""

    scale: float = 4  # any factor (output round(s·W) × round(s·H)); whole numbers take the integer path
    color_fix: str = "adain"
    prompt: str = ""
    tags: str | None = None
    tile: int = 96
    tile_overlap: int = 32
    vae_encoder_tile: int = 1024
    vae_decoder_tile: int = 224
    seed: int | None = None
    sample_latent: bool = False


@dataclass
class JobResult:
    output: Path  # the exact PNG, as `osediff sr` writes it
    before: Path  # bicubic ×s of the input, same size, for the slider
    tags: str  # the tags the UNet was conditioned on
    prompt: str  # the whole prompt
    size: tuple[int, int]  # (W, H) of the output
    bits: int
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, in order
    peak_memory: str = ""


def gradio_temp_dir() -> Path:
    """Gradio's own temporary folder (GRADIO_TEMP_DIR, else <tmp>/gradio): the only place jobs write to."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")


class Runner:
    """Runs the page's jobs on one loaded `OSEDiffPipeline`. Public call: `run(path, options, progress)`."""

    def __init__(self, pipe, *, max_megapixels: float = 2.0):
        self.pipe, self.max_megapixels = pipe, max_megapixels
        self._device = threading.Lock()
        self._cancel = threading.Event()
        self.running_for: str | None = None  # the session whose job holds the device

    def cancel(self, session: str | None = None) -> bool:
        """Ask the running job (of `session`, when given) to stop at its next stage or UNet tile."""
        if self.running_for is None or (session is not None and session != self.running_for):
            return False
        self._cancel.set()
        return True

    def check(self, path: str | os.PathLike | None):
        """The upload as a `Picture`, or a `JobError` saying why not. The page's cap is checked from the header
        by the reader `osediff sr` uses (`read_image`), before any pixel is decoded."""
        from PIL import UnidentifiedImageError

        from osediff.files.images import ImageReadError, MissingReaderError, TooManyPixelsError, read_image

        if path is None:
            raise JobError("No image: upload, drop or paste one first.")
        path = Path(path)
        if not path.is_file() or path.stat().st_size == 0:
            raise JobError(f"{path.name}: the file is empty.")
        try:
            return read_image(path, max_megapixels=self.max_megapixels)
        except TooManyPixelsError as e:
            (w, h) = e.size
            raise JobError(f"{path.name} is {w}×{h} ({w * h / 1e6:.1f} megapixels); this page takes at most "
                           f"{self.max_megapixels:g} megapixels (osediff ui --max-megapixels).") from e
        except MissingReaderError as e:  # say what to install, as `osediff sr` does
            raise JobError(str(e).replace(f"cannot read {path}: ", f"{path.name}: ")) from e
        except ImageReadError as e:
            if isinstance(e.__cause__, UnidentifiedImageError):
                raise JobError(f"{path.name} is not an image this page can read.") from e
            raise JobError(f"{path.name} is damaged and cannot be decoded.") from e

    def preview(self, path: str | os.PathLike | None, long_side: int = 1024) -> Path | None:
        """For an upload the browser cannot show (HEIC, camera RAW, JPEG XL, TIFF): the developed picture as an
        8-bit PNG (long side at most `long_side`) in Gradio's temporary folder; None for formats browsers show
        themselves, and for files that cannot be read (Upscale then says why)."""
        from PIL import Image

        from osediff.files.formats import identify
        from osediff.files.images import Picture, to_pil

        if path is None or not Path(path).is_file() or identify(Path(path)) not in BROWSER_CANNOT_SHOW:
            return None
        try:
            pic = self.check(path)
        except JobError:
            return None
        if pic.bits == 16:
            pic = Picture((pic.rgb >> 8).astype("uint8"), None if pic.alpha is None else (pic.alpha >> 8).astype("uint8"))
        im = to_pil(Picture(pic.rgb, pic.alpha, pic.gray))
        im.thumbnail((long_side, long_side), Image.BICUBIC)
        folder = Path(tempfile.mkdtemp(prefix="osediff-preview-", dir=_ensure(gradio_temp_dir())))
        out = folder / f"{Path(path).stem}_developed.png"
        im.save(out)
        return out

    def run(self, path, options: JobOptions = JobOptions(), progress: Callable[[float, str], None] | None = None,
            session: str | None = None) -> JobResult:
        """Upscale one uploaded file. `progress(fraction, label)` is told as each stage starts; raises JobError
        for bad input and Cancelled when `cancel()` was called meanwhile."""
        import torch

        from osediff.core.model import progress_fraction
        from osediff.core.pipeline import OSEDiffPipeline
        from osediff.core.prompts import FixedTags, TagRecorder

        pic = self.check(path)
        times: list[tuple[str, float]] = []
        say = progress or (lambda fraction, label: None)
        with self._device:  # one job at a time on the device
            self._cancel.clear()
            self.running_for = session
            device = self.pipe.model.device
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

            def stage(name: str, done: int, total: int) -> None:
                if self._cancel.is_set():
                    raise Cancelled
                if done == 0:  # a stage starts (the UNet and the tiled VAE also report each tile step)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # so the stage times are the device's, not the launches'
                    times.append((name, time.perf_counter()))
                say(0.0 if name == "read" else progress_fraction(name, done, total), STAGE_LABEL[name] + (
                    f" tile {done + 1}/{total}" if name == "unet" and total > 1 else
                    f" step {done}/{total}" if done else ""))

            tags = TagRecorder(self.pipe.extractor if options.tags is None else FixedTags(options.tags))
            pipe = OSEDiffPipeline(self.pipe.model, tags, self.pipe.options).with_options(
                scale=options.scale, color_fix=options.color_fix, prompt=options.prompt, tile=options.tile,
                tile_overlap=options.tile_overlap, vae_encoder_tile=options.vae_encoder_tile,
                vae_decoder_tile=options.vae_decoder_tile, seed=options.seed, sample_latent=options.sample_latent)
            try:
                stage("read", 0, 1)
                out, prompt = pipe.run_picture(pic, progress=stage)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(("end", time.perf_counter()))
            finally:
                self.running_for = None
                self._cancel.clear()
            peak = _peak_memory(device)
        folder = Path(tempfile.mkdtemp(prefix="osediff-", dir=_ensure(gradio_temp_dir())))
        stem = Path(path).stem
        output, before = folder / f"{stem}_osediff.png", folder / f"{stem}_bicubic.png"
        from osediff.files.images import write_image

        write_image(output, out)
        _bicubic(pic, out.size).save(before)
        seconds = {name: t1 - t0 for (name, t0), (_, t1) in zip(times, times[1:])}
        return JobResult(output, before, tags.seen[-1], prompt, out.size, out.bits, seconds, peak)

    def run_many(self, paths: list, options: JobOptions = JobOptions(),
                 progress: Callable[[float, str], None] | None = None, session: str | None = None,
                 ) -> tuple[list[JobResult], list[str], Path | None, list[str]]:
        """Several uploads, each with DAPE's own tags: (results, one error line per failed file, a zip of the
        results or None, the names of files that are not pictures). The rules of `osediff sr`: what is not a
        picture at all (a notes.txt) is ignored and named; a picture that cannot be read costs only itself."""
        from osediff.files.images import is_image_file

        results, errors = [], []
        kept = [(p, is_image_file(Path(p))) for p in paths if p is not None]  # each file's head read once
        ignored = [Path(p).name for p, picture in kept if not picture]
        paths = [p for p, picture in kept if picture]
        say = progress or (lambda fraction, label: None)
        for i, path in enumerate(paths):
            def sub(fraction: float, label: str, i=i) -> None:
                say((i + fraction) / len(paths), f"image {i + 1}/{len(paths)}: {label}")

            try:
                results.append(self.run(path, options, sub, session))
            except JobError as e:
                errors.append(str(e))
        if not results:
            return results, errors, None, ignored
        archive = results[0].output.parent / "osediff_results.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as z:  # PNGs are compressed already
            names = set()
            for r in results:
                name = r.output.name
                while name in names:  # two uploads with one name
                    name = "_" + name
                names.add(name)
                z.write(r.output, name)
        return results, errors, archive, ignored


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _bicubic(pic, size: tuple[int, int]):
    """The input enlarged to `size` with PIL's bicubic filter, as an 8-bit PIL image (the slider's 'before')."""
    from PIL import Image

    from osediff.files.images import to_pil

    im = to_pil(pic)
    if pic.bits == 16:  # for display only: the 'after' image and the download keep 16 bits
        import numpy as np

        im = Image.fromarray((pic.rgb >> 8).astype(np.uint8), "RGB")
    return im.resize(size, Image.BICUBIC)


def _peak_memory(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on the GPU (this job)"
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        return f"{rss:.2f} GiB process peak RSS (since start)"
    except ImportError:  # Windows
        return ""
