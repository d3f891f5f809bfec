"""Evaluation with the authors' metric protocol (spec §5): `osediff eval`.

`metrics`: PSNR/SSIM on BT.601 Y as pure functions; `lpips`: LPIPS-VGG v0.1, also a training loss (spec §4.3);
`evaluate`: pairing SR and HR files, running the metrics, `summary.json` / `per_image.csv`; `report`: the
self-contained HTML report.
"""
