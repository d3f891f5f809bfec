"""Evaluation with the authors' metric protocol (spec §5): `osediff eval`.

`metrics`: PSNR/SSIM on BT.601 Y as pure functions; `niqe`: NIQE as pure numpy functions; `lpips`: LPIPS-VGG
v0.1, also a training loss (spec §4.3); `backends`: which implementation (pyiqa or permissive) computes each
learned metric, with its licence; `evaluate`: pairing SR and HR files, running the metrics, `summary.json` /
`per_image.csv`; `report`: the self-contained HTML report.
"""
