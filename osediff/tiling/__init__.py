"""Tiling for large images (spec §1.6, §1.7, §1.9): pure tile geometry plus drivers, no weights.

`latent`: the UNet's latent tile grid with Gaussian blending, as the reference. `vae`: the exact tiled VAE
encode/decode (global GroupNorm statistics, global mid-block attention), run by `lockstep`, which holds the
core + halo geometry and pauses every tile at each sync point. `store`: where tile states wait between sync
points (the device, host memory, spill files), for `--max-memory`.
"""
