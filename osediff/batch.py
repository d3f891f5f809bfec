"""Super-resolving files: inputs (files, folders, globs) -> `OUTDIR/<stem>[_suffix].<ext>`, one at a time.

Nothing is lost: an unreadable file is reported and skipped while the rest go on (the exit status says so),
outputs are written atomically, an input is never overwritten, `skip_existing` resumes an interrupted run,
and under `accelerate launch` / torchrun each process takes its own share of the inputs.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def image_extensions() -> set[str]:
    """Every file extension Pillow can open (plus .png for 16-bit)."""
    from PIL import Image

    exts = {e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return exts | {".png"}


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Expand files, folders (non-recursive, images only, sorted) and glob patterns; keep order, drop repeats.
    A name that matches nothing raises FileNotFoundError."""
    exts = image_extensions()
    found: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in exts)
        elif p.is_file():
            found.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(p)) if Path(m).is_file())
            if not matches:
                raise FileNotFoundError(f"input not found: {item}")
            found += matches
    return list(dict.fromkeys(found))


def output_path(src: Path, output_dir: Path, ext: str = "png", suffix: str = "") -> Path:
    """`output_dir/<stem>[_suffix].<ext>`; ext "auto" keeps the input's extension."""
    e = src.suffix.lstrip(".") if ext == "auto" else ext.lstrip(".")
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
              skip_existing: bool = False, save_prompts: bool = False, progress: bool = True) -> BatchResult:
    """Run `pipe.run_picture` over files; see the module docstring for the guarantees."""
    from tqdm import tqdm

    from osediff.imageio import ImageReadError, read_image, write_image

    output_dir = Path(output_dir)
    result = BatchResult()
    pairs = plan(shard(paths), output_dir, ext, suffix)
    bar = tqdm(pairs, unit="img", disable=not progress, dynamic_ncols=True)
    for src, dst in bar:
        if skip_existing and dst.exists():
            result.skipped.append(src)
            continue
        bar.set_postfix_str(src.name)
        t0 = time.perf_counter()
        try:
            pic = read_image(src)
            out, prompt = pipe.run_picture(pic)
            write_image(dst, out)
            if save_prompts:
                txt = output_dir / "txt" / f"{src.name.split('.')[0]}.txt"
                txt.parent.mkdir(parents=True, exist_ok=True)
                txt.write_text(prompt)
        except (ImageReadError, FileNotFoundError) as e:
            log.error("%s", e)
            result.failed.append((src, str(e)))
            continue
        except Exception as e:  # one bad image must not end a long run; the error is reported at the end
            if "out of memory" in str(e).lower():
                log.error("%s: out of memory; try smaller --tile / --vae-decoder-tile or --dtype fp16", src)
            else:
                log.exception("%s failed", src)
            result.failed.append((src, f"{type(e).__name__}: {e}"))
            continue
        result.done.append(src)
        bar.set_postfix_str(f"{src.name} {time.perf_counter() - t0:.2f}s/img")
    if result.failed:
        log.error("%d of %d images failed: %s", len(result.failed), len(pairs),
                  ", ".join(str(p) for p, _ in result.failed[:10]))
    return result


def super_resolve_files(inputs: list[str], output_dir: str, *, base: str | None, weights: str | None,
                        dape: str | None = None, ram: str | None = None, use_dape: bool = True,
                        device: str | None = None, dtype: str | None = None, options=None, ext: str = "png",
                        suffix: str = "", skip_existing: bool = False, save_prompts: bool = False) -> int:
    """Load the pipeline and super-resolve `inputs` into `output_dir`; returns the exit status (0 = all done)."""
    from osediff.options import SROptions
    from osediff.pipeline import OSEDiffPipeline

    paths = collect_inputs(inputs)
    if device is None and int(os.environ.get("WORLD_SIZE", 1)) > 1 and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    pipe = OSEDiffPipeline.from_pretrained(base, weights, device=device, dtype=dtype, ram=ram, dape=dape,
                                           use_dape=use_dape, options=options or SROptions())
    res = run_batch(pipe, paths, output_dir, ext=ext, suffix=suffix, skip_existing=skip_existing,
                    save_prompts=save_prompts)
    log.info("%d written, %d skipped (existing), %d failed -> %s", len(res.done), len(res.skipped),
             len(res.failed), output_dir)
    return res.exit_code
