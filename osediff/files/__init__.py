"""Files: image decoding and encoding (`images`) and atomic writes (`atomic`); weights live in `osediff.weights`.

The only place that knows file formats; nothing here imports torch at module level, nor any other part of
osediff, so every other package may use it.
"""
