"""osediff: one-step diffusion super-resolution (OSEDiff, Wu et al., NeurIPS 2024, arXiv 2406.08177).

`import osediff` is cheap: the heavy modules (torch, diffusers) load only when a name below is used.
The tree: `core` (the one-step SR pipeline), `tiling`, `dape` (the tagger), `degradation`, `evaluation`,
`files`, `weights`, `train`, and the front-end `cli` + `commands`.
"""

__version__ = "0.1.0"

__all__ = ["OSEDiffModel", "OSEDiffPipeline", "__version__"]


def __getattr__(name: str):
    # Lazy export, so `import osediff` (and `osediff --help`) does not import torch/diffusers.
    if name == "OSEDiffPipeline":
        from osediff.core.pipeline import OSEDiffPipeline

        return OSEDiffPipeline
    if name == "OSEDiffModel":
        from osediff.core.model import OSEDiffModel

        return OSEDiffModel
    raise AttributeError(f"module 'osediff' has no attribute {name!r}")
