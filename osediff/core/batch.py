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
    reruns: int = 0  # images rerun in fp32 after non-finite fp16/bf16 values (`OSEDiffModel._rerun_nonfinite`)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Expand files, folders (non-recursive, images only, sorted) and glob patterns; keep order, drop repeats.
    A name that matches nothing raises FileNotFoundError."""
    from osediff.files.images import is_image_file

    found: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found += sorted(f for f in p.iterdir() if is_image_file(f))
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
              skip_existing: bool = False, save_prompts: bool = False, batch_size: int = 1,
              progress: bool = True) -> BatchResult:
    """Super-resolve files with `pipe`; see the module docstring for the guarantees.

    With `batch_size` > 1, up to that many consecutive images of the same size and bit depth go through the
    networks together; a batch that fails is retried one image at a time, so one bad image loses only itself.
    """
    from tqdm import tqdm

    from osediff.files.images import ImageReadError, read_image

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
    for i in range(0, len(todo), bs):
        groups: dict[tuple, list] = {}
        for src, dst in todo[i:i + bs]:
            try:
                pic = read_image(src)
            except (ImageReadError, FileNotFoundError) as e:
                log.error("%s", e)
                result.failed.append((src, str(e)))
                bar.update(1)
                continue
            groups.setdefault((pic.size, pic.bits), []).append((src, dst, pic))
        for group in groups.values():
            bar.set_postfix_str(group[0][0].name)
            t0 = time.perf_counter()
            try:
                _run_group(pipe, group, output_dir, save_prompts)
            except Exception as e:  # isolate the failing image, keep the run going
                if len(group) > 1:
                    log.warning("a batch of %d failed (%s); retrying one by one", len(group), e)
                    for item in group:
                        _run_one_safely(pipe, item, output_dir, save_prompts, result)
                        bar.update(1)
                    continue
                _report_failure(group[0][0], e, result)
                bar.update(1)
                continue
            result.done += [src for src, _, _ in group]
            bar.update(len(group))
            bar.set_postfix_str(f"{group[-1][0].name} {(time.perf_counter() - t0) / len(group):.2f}s/img")
    bar.close()
    result.reruns = _reruns(pipe) - reruns0
    if result.failed:
        log.error("%d of %d images failed: %s", len(result.failed), len(pairs),
                  ", ".join(str(p) for p, _ in result.failed[:10]))
    return result


def _run_group(pipe, group: list, output_dir: Path, save_prompts: bool) -> None:
    from osediff.files.images import write_image

    outs = pipe.run_pictures([pic for _, _, pic in group])
    for (src, dst, _), (out, prompt) in zip(group, outs):
        write_image(dst, out)
        if save_prompts:  # the reference's name: text before the first dot
            txt = output_dir / "txt" / f"{src.name.split('.')[0]}.txt"
            txt.parent.mkdir(parents=True, exist_ok=True)
            txt.write_text(prompt, encoding="utf-8")


def _reruns(pipe) -> int:
    """Images the pipeline's model has rerun in fp32 so far (0 for pipelines without the counter)."""
    return getattr(getattr(pipe, "model", None), "reruns", {}).get("images", 0)


def _run_one_safely(pipe, item, output_dir: Path, save_prompts: bool, result: BatchResult) -> None:
    try:
        _run_group(pipe, [item], output_dir, save_prompts)
        result.done.append(item[0])
    except Exception as e:  # reported at the end; the run goes on
        _report_failure(item[0], e, result)


def _report_failure(src: Path, e: Exception, result: BatchResult) -> None:
    if "out of memory" in str(e).lower():
        log.error("%s: out of memory; try a smaller --tile / --vae-decoder-tile, --vae-offload or --dtype fp16", src)
    else:
        log.error("%s failed: %s: %s", src, type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
    result.failed.append((src, f"{type(e).__name__}: {e}"))


def super_resolve_files(inputs: list[str], output_dir: str, *, base: str | None, weights: str | None,
                        dape: str | None = None, ram: str | None = None, use_dape: bool = True,
                        device: str | None = None, dtype: str | None = None, options=None, ext: str = "png",
                        suffix: str = "", skip_existing: bool = False, save_prompts: bool = False,
                        batch_size: int = 1, merge: bool = True, compile: bool = False,
                        offline: bool | None = None) -> int:
    """Load the pipeline and super-resolve `inputs` into `output_dir`; returns the exit status (0 = all done)."""
    from osediff.core.options import SROptions
    from osediff.core.pipeline import OSEDiffPipeline

    paths = collect_inputs(inputs)
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
    res = run_batch(pipe, paths, output_dir, ext=ext, suffix=suffix, skip_existing=skip_existing,
                    save_prompts=save_prompts, batch_size=batch_size)
    rerun = f", {res.reruns} rerun in fp32 after non-finite values" if res.reruns else ""
    log.info("%d written, %d skipped (existing), %d failed%s -> %s", len(res.done), len(res.skipped),
             len(res.failed), rerun, output_dir)
    return res.exit_code
