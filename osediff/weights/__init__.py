"""Weights: where each file lives (`locate`), where it comes from (`sources`), fetching it (`download`), and
whether a file on disk is what it claims to be (`check`, with the expected layouts in `layout`).

Layer 0: nothing here imports torch at module level, nor any other part of osediff except `files`, so the
model code (`core`, `dape`) and every front-end may use it.
"""
