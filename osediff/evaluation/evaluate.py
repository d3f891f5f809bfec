"""Evaluate super-resolved images against ground truth: pair the files by name, run the metrics, write the
results (spec §5).

The authors' script pairs SR and HR files by sorted index and only checks the counts (spec §5.1), so one
missing file silently shifts every later pair. Here files are paired by stem (`Canon_001_LR4.png` in both
folders), and any missing, extra, duplicated or wrongly sized file stops the evaluation with a list of
what is wrong: no mean is ever taken over a wrong pairing.

PSNR, SSIM and NIQE are computed in-house (`osediff.evaluation.metrics`, `osediff.evaluation.niqe`: the authors'
protocol, reproduced to the last logged digit). The learned metrics (LPIPS, DISTS, MUSIQ, MANIQA-pipal, CLIPIQA,
FID) come from a backend (`osediff.evaluation.backends`): pyiqa by default, as the authors (optional extra
`osediff[eval]`, non-commercial licence), or permissively licensed code where it exists. Backends are imported
only when one of their metrics is asked for, and when one (or a metric's weights) is missing, the in-house
metrics still run and the reason is recorded. `summary.json` names every metric's implementation and licence.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from osediff import __version__
from osediff.evaluation.backends import (  # noqa: F401  (re-exported: the metric adapters live there)
    BACKENDS,
    FULL_REFERENCE,
    PYIQA_INSTALL_HINT,
    PYIQA_NAMES,
    LearnedMetric,
    load_learned_metrics,
    source,
)
from osediff.evaluation.metrics import psnr, ssim
from osediff.evaluation.niqe import niqe
from osediff.files.images import is_image_file

log = logging.getLogger(__name__)

IN_HOUSE = ("psnr", "ssim", "niqe")
PER_IMAGE_LEARNED = ("lpips", "dists", "musiq", "maniqa", "clipiqa")
DATASET_LEVEL = ("fid",)  # one number for the whole folder
ALL_METRICS = IN_HOUSE + PER_IMAGE_LEARNED + DATASET_LEVEL
LOWER_IS_BETTER = frozenset({"lpips", "dists", "niqe", "fid"})

PROTOCOL = {
    "spec": "osediff spec §5.1 (the authors' test_metrics.py, pyiqa 0.1.10 settings)",
    "pairing": "by file stem; missing, extra, duplicate or size-mismatched files are an error",
    "reading": "RGB float in [0, 1] (PIL), batch 1",
    "psnr": "BT.601 Y (16 + 65.481R + 128.553G + 24.966B)/255, not rounded; data range 1; "
            "10*log10(1/(mse + 1e-8)); no border crop",
    "ssim": "BT.601 Y*255 rounded, float64; 11x11 Gaussian sigma 1.5, 'valid'; C1=(0.01*255)^2, "
            "C2=(0.03*255)^2; cs map clamped >= 0; no downsampling; no border crop",
    "niqe": "YIQ Y*255 rounded (float32 as on the authors' GPU); top-left crop to 96x96 blocks; MSCN with a 7x7 "
            "Gaussian (sigma 7/6, replicate); 18 AGGD features per block at full and MATLAB-imresize half scale; "
            "MATLAB's pristine model; no border crop",
    "learned": {name: f"pyiqa.create_metric({pyiqa!r}) with its defaults (backend pyiqa)"
                for name, pyiqa in PYIQA_NAMES.items()},
    "maniqa": "random crops: torch.manual_seed(seed) before each image",
    "fid": "pyiqa fid(hr_dir, sr_dir), Clean-FID mode, one number per folder",
    "mean": "arithmetic mean over images",
}

# ---------------------------------------------------------------------------------------------- pairing
@dataclass(frozen=True)
class Pair:
    """One evaluated image: the SR output, its ground truth and, optionally, the LR input (report only)."""

    name: str
    sr: Path
    hr: Path
    lr: Path | None = None


class PairingError(ValueError):
    """The SR and HR folders do not hold the same images; `problems` lists each one, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("cannot pair the images:\n  " + "\n  ".join(problems))


def list_images(folder: str | Path) -> dict[str, Path]:
    """Image files directly in `folder`, by stem. Raises `PairingError` on a missing folder or a stem used
    twice (`a.png` and `a.jpg`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PairingError([f"not a folder: {folder}"])
    images: dict[str, Path] = {}
    duplicates = []
    for path in sorted(folder.iterdir()):
        if is_image_file(path):
            if path.stem in images:
                duplicates.append(f"{folder}: two files for '{path.stem}': {images[path.stem].name}, {path.name}")
            images[path.stem] = path
    if duplicates:
        raise PairingError(duplicates)
    return images


def _summarise(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def pair_images(sr_dir: str | Path, hr_dir: str | Path, lr_dir: str | Path | None = None) -> list[Pair]:
    """Pair the SR and HR images by file stem, sorted by name.

    Raises `PairingError` naming every SR image without an HR image (extra), every HR image without an SR
    image (missing), and every pair whose sizes differ. LR images are optional: one that is missing only
    leaves a blank in the report (logged); the LR folder is never checked for size.
    """
    sr, hr = list_images(sr_dir), list_images(hr_dir)
    problems = []
    if not hr:
        problems.append(f"no images in the HR folder {hr_dir}")
    if not sr:
        problems.append(f"no images in the SR folder {sr_dir}")
    missing = sorted(hr.keys() - sr.keys())
    extra = sorted(sr.keys() - hr.keys())
    if missing and sr:
        problems.append(f"{len(missing)} HR image(s) have no SR image in {sr_dir}: {_summarise(missing)}")
    if extra and hr:
        problems.append(f"{len(extra)} SR image(s) have no HR image in {hr_dir}: {_summarise(extra)}")
    for name in sorted(sr.keys() & hr.keys()):
        with Image.open(sr[name]) as a, Image.open(hr[name]) as b:  # reads the headers only
            if a.size != b.size:
                problems.append(f"size mismatch for '{name}': SR {a.size[0]}x{a.size[1]} ({sr[name]}) "
                                f"vs HR {b.size[0]}x{b.size[1]} ({hr[name]})")
    if problems:
        raise PairingError(problems)

    lr = list_images(lr_dir) if lr_dir is not None else {}
    if lr_dir is not None and (no_lr := sorted(hr.keys() - lr.keys())):
        log.warning("%d image(s) have no LR image in %s (left blank in the report): %s",
                    len(no_lr), lr_dir, _summarise(no_lr))
    return [Pair(name, sr[name], hr[name], lr.get(name)) for name in sorted(hr)]


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as `(3, H, W)` float64 RGB in [0, 1] (spec §5.1 reads with cv2 then converts to RGB;
    PIL gives the same pixels for 8-bit PNG). Alpha is dropped, greyscale is repeated to three channels."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0  # (H, W, 3)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------- metrics
def parse_metrics(spec: str) -> tuple[str, ...]:
    """'psnr,ssim,lpips' -> ('psnr', 'ssim', 'lpips'); 'all' -> every metric. Order follows ALL_METRICS."""
    asked = {m.strip().lower() for m in spec.split(",") if m.strip()}
    if "all" in asked:
        return ALL_METRICS
    unknown = sorted(asked - set(ALL_METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(ALL_METRICS)} or 'all'")
    if not asked:
        raise ValueError("no metric given")
    return tuple(m for m in ALL_METRICS if m in asked)


# ---------------------------------------------------------------------------------------------- running
@dataclass
class MethodResult:
    """One method's scores: `values[metric][i]` belongs to `pairs[i]`; `dataset_values` holds FID."""

    label: str
    sr_dir: Path
    pairs: list[Pair]
    values: dict[str, list[float]]
    dataset_values: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.pairs]

    def means(self) -> dict[str, float]:
        """Arithmetic mean over images per metric (spec §5.1), then the dataset-level metrics."""
        means = {m: float(np.mean(v)) for m, v in self.values.items()}
        return means | self.dataset_values


def _niqe_or_nan(sr: np.ndarray) -> float:
    """NIQE needs no reference; an image smaller than one 96×96 block has none (NaN, logged), as a mean over
    such a folder would mean nothing."""
    if min(sr.shape[-2:]) < 96:
        log.warning("NIQE is undefined for a %dx%d image (< 96x96): NaN", sr.shape[-1], sr.shape[-2])
        return math.nan
    return float(niqe(sr))


def evaluate_pairs(pairs: Sequence[Pair], metrics: Sequence[str], *, label: str, sr_dir: str | Path,
                   learned: dict[str, LearnedMetric] | None = None, progress: bool = True) -> MethodResult:
    """Score every pair with the in-house metrics in `metrics` and the `learned` ones, then FID if given.

    Metrics in `metrics` that are neither in-house nor in `learned` are skipped (the caller records why).
    """
    learned = learned or {}
    per_image = [m for m in metrics if m in IN_HOUSE or (m in learned and m not in DATASET_LEVEL)]
    in_house: dict[str, Callable[[np.ndarray, np.ndarray], float | np.ndarray]] = {
        "psnr": psnr, "ssim": ssim, "niqe": lambda sr, hr: _niqe_or_nan(sr)}
    values: dict[str, list[float]] = {m: [] for m in per_image}
    seconds: dict[str, float] = dict.fromkeys(per_image, 0.0)
    seconds["read"] = 0.0
    for pair in tqdm(pairs, desc=f"eval {label}", unit="img", disable=not progress or None, leave=False):
        t = time.perf_counter()
        sr, hr = read_rgb(pair.sr), read_rgb(pair.hr)
        seconds["read"] += time.perf_counter() - t
        for m in per_image:
            t = time.perf_counter()
            values[m].append(float(in_house[m](sr, hr) if m in IN_HOUSE else learned[m](sr, hr)))
            seconds[m] += time.perf_counter() - t
    dataset_values = {}
    for m in DATASET_LEVEL:
        if m in metrics and m in learned:
            t = time.perf_counter()
            dataset_values[m] = learned[m].folders(pairs[0].hr.parent, sr_dir)
            seconds[m] = time.perf_counter() - t
    return MethodResult(label, Path(sr_dir), list(pairs), values, dataset_values, seconds)


@dataclass
class Evaluation:
    """Everything `osediff eval` reports: one `MethodResult` per SR folder (the first is the main one)."""

    hr_dir: Path
    lr_dir: Path | None
    metrics: tuple[str, ...]  # as asked
    methods: list[MethodResult]
    versions: dict[str, str]  # metric -> library that computed it
    unavailable: dict[str, str]  # metric -> why it was not computed
    seconds: dict[str, float]
    backend: str = "pyiqa"  # for the learned metrics

    def sources(self) -> dict[str, dict[str, Any]]:
        """metric -> its implementation, licence and comparability with the paper (asked metrics, in order)."""
        return {m: s.as_dict() if (s := source(m, self.backend)) else
                {"backend": self.backend, "implementation": None, "licence": None, "comparable_with_paper": None,
                 "note": f"not offered by the {self.backend} backend"} for m in self.metrics}

    @property
    def computed(self) -> list[str]:
        """The metrics that have numbers, in the order asked."""
        first = self.methods[0]
        return [m for m in self.metrics if m in first.values or m in first.dataset_values]


def _labels(dirs: Sequence[Path]) -> list[str]:
    labels: list[str] = []
    for d in dirs:
        label = d.resolve().name or str(d)
        labels.append(label if label not in labels else f"{label} ({len(labels) + 1})")
    return labels


def evaluate(sr_dirs: Sequence[str | Path], hr_dir: str | Path, metrics: Sequence[str], *,
             lr_dir: str | Path | None = None, device: str | None = None, seed: int = 0,
             backend: str = "pyiqa", weights: dict[str, str | None] | None = None,
             progress: bool = True) -> Evaluation:
    """Evaluate one or more SR folders (e.g. ours and the authors') against the same HR folder.

    Steps: pair every folder with HR by name (all pairings are checked before any metric runs), create the
    learned metrics, score each folder. Raises `PairingError` if any folder does not pair exactly.
    """
    t0 = time.perf_counter()
    sr_dirs = [Path(d) for d in sr_dirs]
    # 1. pair (fails fast, before loading any model)
    all_pairs = [pair_images(d, hr_dir, lr_dir) for d in sr_dirs]
    # 2. learned metrics, if asked for and available
    learned, versions, unavailable = load_learned_metrics(metrics, backend=backend, device=device, seed=seed,
                                                          weights=weights)
    for name, reason in unavailable.items():
        log.error("%s not computed: %s", name, reason)
    for m in IN_HOUSE:
        if m in metrics:
            versions[m] = (f"osediff {__version__} in-house (pyiqa 0.1.10 protocol), numpy {np.__version__}, "
                           f"python {platform.python_version()}")
    if unavailable:
        log.info("in-house, without any backend: %s; --backend permissive offers %s", ", ".join(IN_HOUSE),
                 ", ".join(m for m in ALL_METRICS if source(m, "permissive") and m not in IN_HOUSE))
    # 3. score each folder
    methods = [evaluate_pairs(pairs, metrics, label=label, sr_dir=d, learned=learned, progress=progress)
               for pairs, label, d in zip(all_pairs, _labels(sr_dirs), sr_dirs)]
    seconds = {"evaluate": time.perf_counter() - t0}
    return Evaluation(Path(hr_dir), Path(lr_dir) if lr_dir else None, tuple(metrics), methods, versions,
                      unavailable, seconds, backend)


# ---------------------------------------------------------------------------------------------- outputs
def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4f}"


def format_table(ev: Evaluation, per_image: bool = True) -> str:
    """A plain-text table: one row per image and method (if `per_image`), then the means (4 decimals, as
    the authors' log)."""
    metrics = ev.computed
    multi = len(ev.methods) > 1
    head = ["image"] + (["method"] if multi else []) + [m.upper() + ("↓" if m in LOWER_IS_BETTER else "↑")
                                                        for m in metrics]
    rows = []
    if per_image:
        for i, name in enumerate(ev.methods[0].names):
            for r in ev.methods:
                rows.append([name] + ([r.label] if multi else [])
                            + [_fmt(r.values[m][i]) if m in r.values else "" for m in metrics])
    means = [["mean"] + ([r.label] if multi else []) + [_fmt(r.means()[m]) for m in metrics] for r in ev.methods]
    widths = [max(len(row[c]) for row in [head, *rows, *means]) for c in range(len(head))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if j < (2 if multi else 1) else c.rjust(w)
                         for j, (c, w) in enumerate(zip(row, widths)))

    rule = "-" * len(line(head))
    return "\n".join([line(head), rule, *map(line, rows), *([rule] if rows else []), *map(line, means)])


def write_per_image_csv(ev: Evaluation, path: str | Path) -> Path:
    """`per_image.csv`: columns image, method, then one per per-image metric; full precision."""
    metrics = [m for m in ev.computed if m not in DATASET_LEVEL]
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "method", *metrics])
        for r in ev.methods:
            for i, name in enumerate(r.names):
                w.writerow([name, r.label, *(repr(r.values[m][i]) for m in metrics)])
    return path


def _json_number(x: float) -> float | None:
    return None if math.isnan(x) or math.isinf(x) else x


def summary(ev: Evaluation, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of `summary.json`: means per method, protocol, library versions, timing, options."""
    return {
        "osediff_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hr_dir": str(ev.hr_dir),
        "lr_dir": str(ev.lr_dir) if ev.lr_dir else None,
        "n_images": len(ev.methods[0].pairs),
        "metrics_requested": list(ev.metrics),
        "metrics_computed": ev.computed,
        "unavailable": ev.unavailable,
        "versions": ev.versions,
        "backend": ev.backend,
        "implementations": ev.sources(),
        "methods": {r.label: {"sr_dir": str(r.sr_dir),
                              "means": {m: _json_number(v) for m, v in r.means().items()},
                              "seconds": {k: round(v, 4) for k, v in r.seconds.items()}}
                    for r in ev.methods},
        "protocol": PROTOCOL,
        "seconds": {k: round(v, 4) for k, v in ev.seconds.items()},
        "config": config or {},
    }


def write_summary_json(ev: Evaluation, path: str | Path, config: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.write_text(json.dumps(summary(ev, config), indent=2, default=str) + "\n")
    return path
