"""The one-step SR core (spec §1–§3): low-quality image in, super-resolved image out.

`pipeline.OSEDiffPipeline` is the public call (images in [0, 1], files, PIL); it resizes (`resample`), builds
the prompt (`prompts`), runs `model.OSEDiffModel` (VAE encoder + UNet with LoRA, one step at t = 999 through
`schedule`, frozen decoder) and fixes colour (`colorfix`). `lora` and `checkpoint` hold the LoRA layout and the
weight formats (spec §3), `options` the torch-free run-time options, and `batch` runs the pipeline over files
and folders. Large images are tiled by `osediff.tiling`.
"""
