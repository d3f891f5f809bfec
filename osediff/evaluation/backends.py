"""Which code computes each metric of `osediff eval`, under which licence, and whether its numbers are the paper's.

Three kinds of implementation:

- **in-house** (PSNR, SSIM, NIQE): osediff's own numpy code (Apache-2.0), the authors' protocol reproduced to
  the last logged digit; no optional dependency, whatever `--backend` says.
- **pyiqa** (`--backend pyiqa`, the default; LPIPS, DISTS, MUSIQ, MANIQA, CLIPIQA, FID): the library the
  authors used (spec §5.1), so the numbers are the paper's. Every pyiqa release is non-commercial: 0.1.10 (the
  authors' pin) ships CC BY-NC-SA 4.0 plus the NTU S-Lab License 1.0 in its LICENSE files despite an "Apache"
  classifier, and >= 0.1.16 is PolyForm Noncommercial 1.0.0 (plus the S-Lab licence). It also pulls torchvision.
- **permissive** (`--backend permissive`): permissively licensed code for the same metrics where it exists —
  LPIPS-VGG in-house, DISTS from its authors' MIT package `DISTS_pytorch`, CLIP-IQA and FID from `torchmetrics`
  (Apache-2.0). Not every one gives pyiqa's numbers: `SOURCES` says which, and why.

Each metric object is `metric(sr, hr) -> float` on `(3, H, W)` float arrays in [0, 1] (FID: `metric.folders(hr_dir,
sr_dir)`). Optional libraries are imported only when a metric that needs them is created.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BACKENDS = ("pyiqa", "permissive")
PYIQA_LICENCE = ("non-commercial: pyiqa 0.1.10 is CC BY-NC-SA 4.0 + NTU S-Lab License 1.0 (its 'Apache' "
                 "classifier is wrong), pyiqa >= 0.1.16 is PolyForm Noncommercial 1.0.0 + S-Lab")
IN_HOUSE_LICENCE = "Apache-2.0 (osediff)"
# Our name -> pyiqa's `create_metric` name, with pyiqa's defaults otherwise (spec §5.1).
PYIQA_NAMES = {"lpips": "lpips", "dists": "dists", "musiq": "musiq", "maniqa": "maniqa-pipal",
               "clipiqa": "clipiqa", "fid": "fid"}
PYIQA_INSTALL_HINT = ("pip install 'osediff[eval]' (pyiqa and matplotlib; the authors used pyiqa==0.1.10; "
                      "pyiqa is non-commercial: see README)")
PERMISSIVE_INSTALL_HINT = ("pip install 'osediff[eval-permissive]' (torchmetrics, torch-fidelity, piq, DISTS_pytorch, "
                           "torchvision)")


@dataclass(frozen=True)
class Source:
    """One metric's implementation: what computes it, its licence, and whether it reproduces the paper's table."""

    metric: str
    backend: str  # 'in-house' | 'pyiqa' | 'permissive'
    implementation: str
    licence: str
    comparable: bool  # True: the paper's numbers (reproduced here or by construction)
    note: str

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "implementation": self.implementation, "licence": self.licence,
                "comparable_with_paper": self.comparable, "note": self.note}


def _in_house(metric: str, what: str, note: str) -> Source:
    return Source(metric, "in-house", what, IN_HOUSE_LICENCE, True, note)


def _pyiqa(metric: str) -> Source:
    return Source(metric, "pyiqa", f"pyiqa.create_metric({PYIQA_NAMES[metric]!r}) with its defaults",
                  PYIQA_LICENCE, True, "the authors' library and settings (spec §5.1)")


SOURCES: dict[tuple[str, str], Source] = {
    ("psnr", "in-house"): _in_house("psnr", "osediff.evaluation.metrics.psnr (numpy)",
                                    "reproduces the authors' per-image log to ~4e-6"),
    ("ssim", "in-house"): _in_house("ssim", "osediff.evaluation.metrics.ssim (numpy)",
                                    "reproduces the authors' per-image log to ~4e-6"),
    ("niqe", "in-house"): Source(
        "niqe", "in-house", "osediff.evaluation.niqe (numpy) with MATLAB's NIQE pristine model",
        IN_HOUSE_LICENCE + "; pristine model from basicsr 1.4.2 (Apache-2.0)", True,
        "reproduces the authors' per-image log to 2e-5 and the mean 5.6476"),
    **{(m, "pyiqa"): _pyiqa(m) for m in PYIQA_NAMES},
    ("lpips", "permissive"): Source(
        "lpips", "permissive", "osediff.evaluation.lpips: LPIPS-VGG v0.1 (in-house code)",
        IN_HOUSE_LICENCE + "; weights: torchvision VGG16 (BSD-3-Clause code) + lpips v0.1 heads (BSD-2-Clause)",
        False, "VGG16 trunk, while the paper's LPIPS (pyiqa default) uses AlexNet: a different metric's scale"),
    ("dists", "permissive"): Source(
        "dists", "permissive", "DISTS_pytorch.DISTS (the DISTS authors' package)",
        "MIT (DISTS_pytorch); needs torchvision (BSD-3-Clause) and its ImageNet VGG16",
        True, "same network and weights as pyiqa's port; expected to agree, not verified in osediff's tests"),
    ("clipiqa", "permissive"): Source(
        "clipiqa", "permissive", "torchmetrics CLIPImageQualityAssessment('clip_iqa', prompts=('quality',)) (piq's "
        "CLIP RN50)", "Apache-2.0 (torchmetrics, piq); CLIP weights: OpenAI CLIP (MIT)", False,
        "one prompt pair ('Good photo.'/'Bad photo.'), while pyiqa's clipiqa averages five pairs: not the "
        "paper's numbers"),
    ("fid", "permissive"): Source(
        "fid", "permissive", "torchmetrics FrechetInceptionDistance(feature=2048) (torch-fidelity Inception)",
        "Apache-2.0 (torchmetrics, torch-fidelity)", False,
        "torch-fidelity's resize, not Clean-FID's as in pyiqa: FID values differ from the paper's"),
}


def source(metric: str, backend: str) -> Source | None:
    """The implementation of `metric` under `backend`; in-house metrics ignore the backend. None: not offered."""
    return SOURCES.get((metric, "in-house")) or SOURCES.get((metric, backend))


# ---------------------------------------------------------------------------------------------- metric objects
@dataclass(frozen=True)
class LearnedMetric:
    """A torch metric adapted to our images: `metric(sr, hr)` with `(3, H, W)` arrays in [0, 1] -> float.

    `forward` receives `(1, 3, H, W)` float32 tensors on `device` in [0, 1] (sr, hr) or (sr,) for no-reference
    metrics. For 'fid' call `metric.folders(hr_dir, sr_dir)` instead.
    """

    name: str
    forward: Callable[..., Any]
    device: str
    seed: int
    full_reference: bool
    folder_forward: Callable[[str, str], Any] | None = None

    def __call__(self, sr: np.ndarray, hr: np.ndarray) -> float:
        import torch

        def tensor(x: np.ndarray) -> torch.Tensor:  # (3, H, W) -> (1, 3, H, W) float32, as the authors fed pyiqa
            return torch.from_numpy(x[None].astype(np.float32)).to(self.device)

        torch.manual_seed(self.seed)  # MANIQA scores random crops; the same crops for every run
        with torch.no_grad():
            out = self.forward(tensor(sr), tensor(hr)) if self.full_reference else self.forward(tensor(sr))
        return _scalar(out)

    def folders(self, hr_dir: str | Path, sr_dir: str | Path) -> float:
        import torch

        if self.folder_forward is None:
            raise TypeError(f"{self.name} is a per-image metric")
        with torch.no_grad():
            return _scalar(self.folder_forward(str(hr_dir), str(sr_dir)))


def _scalar(out: Any) -> float:
    return float(out.flatten()[0]) if hasattr(out, "flatten") else float(out)


FULL_REFERENCE = frozenset({"psnr", "ssim", "lpips", "dists"})


def _pyiqa_metrics(names: list[str], device: str | None, seed: int
                   ) -> tuple[dict[str, LearnedMetric], dict[str, str], dict[str, str]]:
    try:
        import pyiqa
        import torch
    except ImportError as e:
        reason = (f"pyiqa is not installed ({e}): {PYIQA_INSTALL_HINT}. Without it, psnr, ssim and niqe are "
                  f"in-house, and --backend permissive offers {', '.join(PERMISSIVE)} (see osediff eval --help)")
        return {}, {}, dict.fromkeys(names, reason)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    version = f"pyiqa {getattr(pyiqa, '__version__', 'unknown')}, torch {torch.__version__}, {device}"
    metrics, versions, unavailable = {}, {}, {}
    for name in names:
        try:
            model = pyiqa.create_metric(PYIQA_NAMES[name], device=torch.device(device))
        except Exception as e:  # pyiqa raises whatever its download or loader raises
            cache = Path(torch.hub.get_dir()) / "pyiqa"
            unavailable[name] = (f"pyiqa could not create '{PYIQA_NAMES[name]}' ({type(e).__name__}: {e}). "
                                 f"pyiqa downloads each metric's weights on first use into {cache} (backbones "
                                 f"into the torch hub cache {torch.hub.get_dir()}); offline, run once with "
                                 "network access or copy the weight files there")
            continue
        fid = name == "fid"
        metrics[name] = LearnedMetric(name, model, device, seed, name in FULL_REFERENCE,
                                      folder_forward=model if fid else None)
        versions[name] = version
    return metrics, versions, unavailable


# ---------------------------------------------------------------------------------------------- permissive backend
def _lpips_vgg(device: str, seed: int, weights: dict[str, str | None]) -> LearnedMetric:
    """LPIPS-VGG v0.1 in-house; weights by --lpips-vgg/--lpips-lin, OSEDIFF_LPIPS_VGG/_LIN, the models folder,
    else the torch hub cache (downloaded once when online)."""
    from osediff.evaluation.lpips import LPIPS
    from osediff.weights.locate import find, missing_message

    vgg = find("lpips_vgg", weights.get("lpips_vgg"), required=False)
    lin = find("lpips_lin", weights.get("lpips_lin"), required=False)
    try:
        model = LPIPS.from_files(vgg, lin).to(device)
    except RuntimeError as e:  # offline and not cached: say where else the files may go
        raise RuntimeError(f"{e}\n{missing_message('lpips_vgg')}\n{missing_message('lpips_lin')}") from e
    return LearnedMetric("lpips", lambda x, y: model(2 * x - 1, 2 * y - 1), device, seed, True)


def _dists(device: str, seed: int, weights: dict[str, str | None]) -> LearnedMetric:
    """DISTS from its authors' package (MIT); it loads torchvision's ImageNet VGG16 through the torch hub cache."""
    from DISTS_pytorch import DISTS

    model = DISTS().to(device).eval()
    return LearnedMetric("dists", lambda x, y: model(x, y, batch_average=False), device, seed, True)


def _clipiqa(device: str, seed: int, weights: dict[str, str | None]) -> LearnedMetric:
    from torchmetrics.multimodal import CLIPImageQualityAssessment

    model = CLIPImageQualityAssessment(model_name_or_path="clip_iqa", data_range=1.0, prompts=("quality",))
    model = model.to(device)
    return LearnedMetric("clipiqa", model, device, seed, False)


def _read(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0


def _fid(device: str, seed: int, weights: dict[str, str | None]) -> LearnedMetric:
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    from osediff.files.images import is_image_file

    def folders(hr_dir: str, sr_dir: str) -> Any:
        fid = FrechetInceptionDistance(feature=2048, normalize=True).to(device)
        for folder, real in ((hr_dir, True), (sr_dir, False)):
            for path in sorted(p for p in Path(folder).iterdir() if is_image_file(p)):
                fid.update(torch.from_numpy(_read(path)[None]).to(device), real=real)
        return fid.compute()

    return LearnedMetric("fid", folders, device, seed, False, folder_forward=folders)


PERMISSIVE = {"lpips": _lpips_vgg, "dists": _dists, "clipiqa": _clipiqa, "fid": _fid}


def load_learned_metrics(names: list[str] | tuple[str, ...], *, backend: str = "pyiqa", device: str | None = None,
                         seed: int = 0, weights: dict[str, str | None] | None = None
                         ) -> tuple[dict[str, LearnedMetric], dict[str, str], dict[str, str]]:
    """Create the learned metrics among `names` with `backend` ('pyiqa' or 'permissive').

    Returns (metrics, versions, unavailable): `versions[name]` says which library computed it,
    `unavailable[name]` why a metric could not be created and what to install or download. Never raises for a
    missing library or missing weights: the caller goes on with the in-house metrics. `weights` may hold
    'lpips_vgg' / 'lpips_lin' file paths (the permissive LPIPS).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    names = [n for n in names if (n, "in-house") not in SOURCES]
    if backend == "pyiqa":
        return _pyiqa_metrics([n for n in names if n in PYIQA_NAMES], device, seed) if names else ({}, {}, {})
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics, versions, unavailable = {}, {}, {}
    for name in names:
        if name not in PERMISSIVE:
            unavailable[name] = (f"no permissively licensed implementation of {name} is offered; "
                                 f"--backend pyiqa computes it ({PYIQA_LICENCE})")
            continue
        try:
            metrics[name] = PERMISSIVE[name](device, seed, weights or {})
        except ImportError as e:
            unavailable[name] = f"{name} (permissive backend) needs a library that is missing ({e}): " \
                                f"{PERMISSIVE_INSTALL_HINT}"
            continue
        except Exception as e:  # missing weights, failed download...
            unavailable[name] = f"could not create the permissive {name} ({type(e).__name__}: {e})"
            if name != "lpips":  # LPIPS's message already lists its flags, env variables and folders
                unavailable[name] += (f". {SOURCES[name, 'permissive'].implementation.split(' ')[0]} downloads its "
                                      f"weights on first use into the torch hub cache {torch.hub.get_dir()}; "
                                      "offline, run once with network access or copy the weight files there")
            continue
        versions[name] = f"{SOURCES[name, 'permissive'].implementation}, torch {torch.__version__}, {device}"
    return metrics, versions, unavailable
