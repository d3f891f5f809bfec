"""osediff: one-step diffusion super-resolution (OSEDiff, Wu et al., NeurIPS 2024, arXiv 2406.08177).

`import osediff` is cheap: the heavy modules (torch, diffusers) load only when a name below is used.
"""

__version__ = "0.1.0"

__all__ = ["OSEDiffPipeline", "__version__"]


def __getattr__(name: str):
    # Lazy export, so `import osediff` (and `osediff --help`) does not import torch/diffusers.
    if name == "OSEDiffPipeline":
        from osediff.pipeline import OSEDiffPipeline

        return OSEDiffPipeline
    raise AttributeError(f"module 'osediff' has no attribute {name!r}")
