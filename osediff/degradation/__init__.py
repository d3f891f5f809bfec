"""Synthetic training degradations (spec §4.2): HQ image batch in, LQ image batch out, on any device.

`realesrgan`: the Real-ESRGAN second-order pipeline (`degrade`) with the release's settings; `face`: the
CodeFormer-style face pipeline (`degrade_face`); their building blocks are `kernels` (blur kernels, as pure
functions) and `jpeg` (differentiable JPEG).
"""
