"""Super-resolving files: inputs (files, folders, globs) -> `OUTDIR/<stem>[_suffix].<ext>`, one at a time.

Nothing is skipped in silence: files that are not pictures are named as ignored, a run that finds no picture
exits 2 saying so, and a picture that cannot be read (corrupt, or a format whose optional reader is missing:
the log line says what to `pip install`) is a failure. Nothing is lost: whatever reading, decoding, processing
or writing one file raises is that file's failure (named in the log, counted, a non-zero exit status at the
end) while the rest go on; only a KeyboardInterrupt or a lost device (`device_lost`: a CUDA/driver error that
leaves the device unusable, or a full / read-only disk) ends the run, and `skip_existing` resumes it. Out of
memory is the file's failure, not the run's: it depends on the image's size, and the next image may fit.
Outputs are written atomically, an input is never overwritten, and under `accelerate launch` / torchrun each
process takes its own share of the inputs.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from osediff.core.options import FileOptions

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    reruns: int = 0  # images rerun in fp32 after non-finite fp16/bf16 values (`OSEDiffModel._rerun_nonfinite`)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


class RunAborted(RuntimeError):
    """The run cannot go on (the device or the disk is lost); the message says how far it got and how to resume."""


# RuntimeError messages after which a CUDA (or ROCm) context is unusable for the rest of the process
_DEVICE_LOST = ("cuda error", "cuda driver", "cudnn_status", "cublas_status", "cusolver_status", "hip error",
                "device-side assert", "illegal memory access", "unspecified launch failure", "ecc error",
                "no cuda gpus are available", "mps backend")


def device_lost(e: BaseException) -> bool:
    """True for errors that no other file would escape: a broken accelerator or a full / read-only disk.
    Out of memory is not one (the next, smaller image may fit; the allocator recovers)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    msg = str(e).lower()
    if type(e).__name__ == "OutOfMemoryError" or "out of memory" in msg or "alloc_failed" in msg:
        return False
    return isinstance(e, RuntimeError) and any(k in msg for k in _DEVICE_LOST)


@dataclass
class InputScan:
    """What a set of inputs holds: the pictures to run, in order, and the files that are not pictures
    (a notes.txt, a .DS_Store), which a run names and leaves alone."""

    images: list[Path] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)


def scan_inputs(inputs: list[str]) -> InputScan:
    """Expand files, folders (non-recursive, sorted) and glob patterns; keep order, drop repeats. Of folders and
    globs every file is looked at by content (`osediff.files.images.is_image_file`: an HEIC named .jpg counts,
    a .txt does not); a file named on its own is always tried. A name that matches nothing raises
    FileNotFoundError."""
    from osediff.files.images import is_image_file

    scan = InputScan()

    def sort_in(files):
        for f in files:
            (scan.images if is_image_file(f) else scan.ignored).append(f)

    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            sort_in(sorted(f for f in p.iterdir() if f.is_file()))
        elif p.is_file():
            scan.images.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(p)) if Path(m).is_file())
            if not matches:
                raise FileNotFoundError(f"input not found: {item}")
            sort_in(matches)
    scan.images = list(dict.fromkeys(scan.images))
    scan.ignored = [f for f in dict.fromkeys(scan.ignored) if f not in set(scan.images)]
    return scan


def collect_inputs(inputs: list[str]) -> list[Path]:
    """The pictures among `inputs` (`scan_inputs(...).images`)."""
    return scan_inputs(inputs).images


def ignored_line(ignored: list[Path], limit: int = 10) -> str:
    """"ignored 2 files that are not images: notes.txt, .DS_Store" (the first `limit` names)."""
    names = ", ".join(f.name for f in ignored[:limit]) + (", ..." if len(ignored) > limit else "")
    return f"ignored {len(ignored)} file{'s' if len(ignored) != 1 else ''} that {'are' if len(ignored) != 1 else 'is'} " \
           f"not {'images' if len(ignored) != 1 else 'an image'}: {names}"


def output_path(src: Path, output_dir: Path, ext: str = "png", suffix: str = "") -> Path:
    """`output_dir/<stem>[_suffix].<ext>`; ext "auto" picks by the input's content
    (`osediff.files.formats.auto_extension`: JPEG->jpg, TIFF->tiff, HEIC/AVIF/JXL->png, RAW->tiff, ...)."""
    from osediff.files.formats import auto_extension

    e = auto_extension(src) if ext == "auto" else ext.lstrip(".")
    return output_dir / f"{src.stem}{'_' + suffix if suffix else ''}.{e}"


def shard(paths: list[Path]) -> list[Path]:
    """This process's share under a multi-process launcher (RANK/WORLD_SIZE set by accelerate or torchrun)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return paths[rank::world] if world > 1 else paths


def plan(paths: list[Path], output_dir: Path, ext: str, suffix: str) -> list[tuple[Path, Path]]:
    """(input, output) pairs; refuses to overwrite an input or to write two inputs to one output."""
    pairs = [(p, output_path(p, output_dir, ext, suffix)) for p in paths]
    seen: dict[Path, Path] = {}
    for src, dst in pairs:
        if dst.resolve() == src.resolve():
            raise ValueError(f"output {dst} would overwrite its input; choose another -o or a --suffix")
        if dst in seen:
            raise ValueError(f"{seen[dst]} and {src} would both be written to {dst}; use --suffix or --ext auto")
        seen[dst] = src
    return pairs


def run_batch(pipe, paths: list[Path], output_dir: str | os.PathLike, *, ext: str = "png", suffix: str = "",
              skip_existing: bool = False, save_prompts: bool = False, batch_size: int = 1,
              progress: bool = True, files: FileOptions = FileOptions()) -> BatchResult:
    """Super-resolve files with `pipe`; see the module docstring for the guarantees.

    With `batch_size` > 1, up to that many consecutive images of the same size and bit depth go through the
    networks together; a batch that fails is retried one image at a time, so one bad image loses only itself.
    `files`: the input size limit, and whether metadata and grayscale are carried into the outputs. Raises
    RunAborted when the device or disk is lost (after logging what was done).
    """
    from tqdm import tqdm

    from osediff.files.images import read_image

    output_dir = Path(output_dir)
    result = BatchResult()
    pairs = plan(shard(paths), output_dir, ext, suffix)
    todo = []
    for src, dst in pairs:
        if skip_existing and dst.exists():
            result.skipped.append(src)
        else:
            todo.append((src, dst))
    bs, reruns0 = max(1, batch_size), _reruns(pipe)
    bar = tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for i in range(0, len(todo), bs):
            groups: dict[tuple, list] = {}
            for src, dst in todo[i:i + bs]:
                try:
                    pic = read_image(src, files.max_input_megapixels)
                except Exception as e:  # unreadable, hostile, vanished: this file's failure
                    if device_lost(e):
                        raise
                    log.error("%s", e)
                    result.failed.append((src, str(e)))
                    bar.update(1)
                    continue
                groups.setdefault((pic.size, pic.bits), []).append((src, dst, pic))
            for group in groups.values():
                bar.set_postfix_str(group[0][0].name)
                t0 = time.perf_counter()
                try:
                    _run_group(pipe, group, output_dir, save_prompts, files, progress)
                except Exception as e:  # isolate the failing image, keep the run going
                    if device_lost(e):
                        raise
                    if len(group) > 1:
                        log.warning("a batch of %d failed (%s); retrying one by one", len(group), e)
                        for item in group:
                            _run_one_safely(pipe, item, output_dir, save_prompts, result, files)
                            bar.update(1)
                        continue
                    _report_failure(group[0][0], e, result)
                    bar.update(1)
                    continue
                result.done += [src for src, _, _ in group]
                bar.update(len(group))
                bar.set_postfix_str(f"{group[-1][0].name} {(time.perf_counter() - t0) / len(group):.2f}s/img")
    except Exception as e:
        bar.close()
        if not device_lost(e):
            raise
        raise RunAborted(f"run stopped, the device or disk is lost ({type(e).__name__}: {e}); {len(result.done)} "
                         f"written, {len(result.failed)} failed; rerun with --skip-existing to resume") from e
    bar.close()
    result.reruns = _reruns(pipe) - reruns0
    if result.failed:
        log.error("%d of %d images failed: %s", len(result.failed), len(pairs),
                  ", ".join(str(p) for p, _ in result.failed[:10]))
    return result


def _run_group(pipe, group: list, output_dir: Path, save_prompts: bool, files: FileOptions,
               progress: bool = False) -> None:
    from osediff.files.images import write_image

    with _image_bar(group[0][0].name, progress and _takes_progress(pipe.run_pictures)) as report:
        kw = {"progress": report} if progress and _takes_progress(pipe.run_pictures) else {}
        outs = pipe.run_pictures([pic for _, _, pic in group], **kw)
    for (src, dst, _), (out, prompt) in zip(group, outs):
        if files.strip_metadata:
            out = replace(out, meta=None)
        if files.keep_rgb:
            out = replace(out, gray=False)
        write_image(dst, out)
        if save_prompts:  # the reference's name: text before the first dot
            txt = output_dir / "txt" / f"{src.name.split('.')[0]}.txt"
            txt.parent.mkdir(parents=True, exist_ok=True)
            txt.write_text(prompt, encoding="utf-8")


def _takes_progress(fn) -> bool:
    """Whether a pipeline's `run_pictures` takes `progress` (stand-ins and older pipelines may not)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "progress" or p.kind is p.VAR_KEYWORD for p in params)


@contextmanager
def _image_bar(name: str, enabled: bool):
    """A second tqdm bar for the image being made: its stage, tile and pass, and the ETA of the whole image (a
    4K image on a CPU takes tens of minutes); yields the pipeline's `progress(stage, done, total)` callback."""
    from tqdm import tqdm

    from osediff.core.model import progress_fraction

    bar = tqdm(total=1.0, position=1, leave=False, disable=not enabled, dynamic_ncols=True,
               bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")

    def report(stage: str, done: int, total: int) -> None:
        bar.n = progress_fraction(stage, done, total)
        bar.set_description_str(f"{name}: {stage}" + (f" {done}/{total}" if total > 1 else ""), refresh=False)
        bar.refresh()

    try:
        yield report
    finally:
        bar.close()


def _reruns(pipe) -> int:
    """Images the pipeline's model has rerun in fp32 so far (0 for pipelines without the counter)."""
    return getattr(getattr(pipe, "model", None), "reruns", {}).get("images", 0)


def _run_one_safely(pipe, item, output_dir: Path, save_prompts: bool, result: BatchResult,
                    files: FileOptions) -> None:
    try:
        _run_group(pipe, [item], output_dir, save_prompts, files)
        result.done.append(item[0])
    except Exception as e:  # reported at the end; the run goes on
        if device_lost(e):
            raise
        _report_failure(item[0], e, result)


def _report_failure(src: Path, e: Exception, result: BatchResult) -> None:
    if "out of memory" in str(e).lower():
        _free_device_memory()
        log.error("%s: out of memory; try a smaller --tile / --vae-decoder-tile, --vae-offload or --dtype fp16", src)
    else:
        log.error("%s failed: %s: %s", src, type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
    result.failed.append((src, f"{type(e).__name__}: {e}"))


def _free_device_memory() -> None:
    """After an out-of-memory error, hand the failed image's cached blocks back so the next image starts clean."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def super_resolve_files(inputs: list[str], output_dir: str, *, base: str | None, weights: str | None,
                        dape: str | None = None, ram: str | None = None, use_dape: bool = True,
                        device: str | None = None, dtype: str | None = None, options=None, ext: str = "png",
                        suffix: str = "", skip_existing: bool = False, save_prompts: bool = False,
                        batch_size: int = 1, merge: bool = True, compile: bool = False,
                        offline: bool | None = None, files: FileOptions = FileOptions()) -> int:
    """Load the pipeline and super-resolve `inputs` into `output_dir`; returns the exit status (0 = all done)."""
    from osediff.core.options import SROptions
    from osediff.core.pipeline import OSEDiffPipeline

    scan = scan_inputs(inputs)
    if scan.ignored:
        log.warning("%s", ignored_line(scan.ignored))
    if not scan.images:
        log.error("no images found in %s", ", ".join(inputs))
        return 2
    paths = scan.images
    if device is None and int(os.environ.get("WORLD_SIZE", 1)) > 1 and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    pipe = OSEDiffPipeline.from_pretrained(base, weights, device=device, dtype=dtype, ram=ram, dape=dape,
                                           use_dape=use_dape, merge=merge, options=options or SROptions(),
                                           offline=offline)
    if compile:
        pipe.model.optimize(compile=True)
    if pipe.extractor is None:  # one prompt for every image: encode it once, free the text encoder's memory
        from osediff.core.prompts import format_prompt

        pipe.model.release_text_encoder([format_prompt("", pipe.options.prompt)])
    try:
        res = run_batch(pipe, paths, output_dir, ext=ext, suffix=suffix, skip_existing=skip_existing,
                        save_prompts=save_prompts, batch_size=batch_size, files=files)
    except RunAborted as e:
        log.error("%s", e)
        return 3
    rerun = f", {res.reruns} rerun in fp32 after non-finite values" if res.reruns else ""
    ignored = f"; {ignored_line(scan.ignored, 3)}" if scan.ignored else ""
    log.info("%d written, %d skipped (existing), %d failed%s -> %s%s", len(res.done), len(res.skipped),
             len(res.failed), rerun, output_dir, ignored)
    return res.exit_code
