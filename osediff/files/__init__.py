"""Files: image decoding and encoding (`images`), atomic writes (`atomic`), and where weights live (`weights`).

The only place that knows file formats; nothing here imports torch at module level, nor any other part of
osediff, so every other package may use it.
"""
