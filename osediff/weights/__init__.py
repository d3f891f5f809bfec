"""Weights: where each file lives (`locate`, and the Hugging Face cache in `hfcache`), where it comes from
(`sources`), fetching it (`download`), and whether a file on disk is what it claims to be (`check`, with the
expected layouts in `layout`). SD 2.1-base may also be one A1111/ComfyUI file: `single_file` says what it is,
`ldm` maps its tensor names to the diffusers modules, `sd21` carries the configs and tokenizer it is built with.

Layer 0: nothing here imports torch at module level, nor any other part of osediff except `files`, so the
model code (`core`, `dape`) and every front-end may use it.
"""
