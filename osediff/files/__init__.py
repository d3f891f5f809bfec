"""Files: image decoding and encoding (`images`), what a file holds by its content (`formats`), the optional
HEIC/JPEG XL/RAW/16-bit TIFF libraries (`extras`), metadata (`metadata`), sample pictures in every format
(`samples`) and atomic writes (`atomic`); weights live in `osediff.weights`.

The only place that knows file formats; nothing here imports torch at module level, nor any other part of
osediff, so every other package may use it.
"""
