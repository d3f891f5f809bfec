"""Exact tiled VAE encode/decode for the SD-2.1 `AutoencoderKL` (spec §1.6, §1.6.1, §1.9, §8.9).

The reference's tiled VAE (spec §1.6.1) approximates GroupNorm with a pixel-weighted mean of per-tile
variances and runs attention inside each tile only, so tiles leave seams. Here the tiled result equals the
untiled one up to float rounding:

* Every tile is a *core* box plus a *halo*. The cores partition the feature map; the halo covers the
  receptive field of all convolutions (derived from the architecture by `encoder_halo` / `decoder_halo`),
  so every core value is computed from exactly the inputs the untiled network sees. At the image border a
  tile ends where the image ends and the conv's own zero padding applies, as untiled.
* All tiles run the network in lockstep and pause at every GroupNorm: per-group statistics of all cores are
  combined exactly (Chan's parallel formula, fp64), then every tile is normalised with the global values.
* The mid-block attention is global: K and V are gathered from all cores, and each tile's queries attend
  to them with `F.scaled_dot_product_attention`.

Convolutions, activations and resamplers are called as the diffusers submodules themselves, so peft-LoRA
wrapped and merged models both work. Each tile is a Python generator (a "tile program") that yields at
sync points; tensors that live across a pause sit on its `Tile` state, so `offload` can park them off the
compute device. Tiles with the same geometry run stacked in batches of `tile_batch`.

Memory: exact statistics need every tile's state at every GroupNorm, so the states of the whole map (the
current activation plus a residual, about 1.1× the untiled ones) exist at once. Without `offload` they
stay on the compute device, and the saving is the per-layer working memory (a 4096² fp16 decode: 14 GiB
peak vs 38 GiB untiled on an H200). With `offload="cpu"` the device holds one tile batch, the global K/V
of the mid-block and the output tiles in flight (3.3 GiB for the same decode), at the cost of moving
every state across PCIe at every sync point (19.5 s instead of 2.6 s). A `TileStore` (`osediff.tiling.store`)
generalises `offload`: states wait on the device, in host memory or in spill files, within quotas, for runs
kept within a memory limit (`osediff.core.memory`); the result is the same bit for bit wherever they wait.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from osediff.tiling.lockstep import Sync, Tile, TileProgram, cdiv, make_tiles, run_lockstep
from osediff.tiling.store import TileStore, offload_store

# Reference tile sizes and halos (spec §1.6.1). The halos are used only to decide *when* to tile, so that we
# tile exactly where the reference does; our own halo comes from the architecture.
ENCODER_TILE, ENCODER_PAD_REF = 1024, 32  # image px
DECODER_TILE, DECODER_PAD_REF = 224, 11  # latent px


# ----------------------------------------------------------------------------------------------------------
# Public API


def encode_moments(
    vae: nn.Module,
    x: torch.Tensor,
    *,
    tile: int = ENCODER_TILE,
    tile_batch: int = 1,
    offload: torch.device | str | TileStore | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Posterior moments `quant_conv(encoder(x))` of a diffusers `AutoencoderKL`, tiled when large.

    x: (B, 3, H, W) in [-1, 1], H and W multiples of 8, any device (tiles are moved to the VAE's device).
    Returns (B, 2·latent_channels, H/8, W/8) in x.dtype: the mean is the first half of the channels, the
    log-variance the second. Runs untiled when max(H, W) <= tile + 2·32 (where the reference does, spec
    §1.6); otherwise tiles with cores of at most `tile` image px. Either way the result equals the untiled
    encoder up to float rounding. `tile_batch` tiles run stacked; `offload` is a device on which tile states
    wait between sync points (None keeps them on the VAE's device), or a `TileStore` that decides per state
    (host memory, disk: `osediff.tiling.store`; the result is the same bit for bit). `on_step(done)` is told
    after each tile batch step, out of `encode_cost(...).steps`. As in the reference, the encoder output
    is cast to quant_conv's dtype.
    """
    _check_4d(x, "x")
    if x.shape[-2] % 8 or x.shape[-1] % 8:
        raise ValueError(f"image height and width must be multiples of 8, got {tuple(x.shape[-2:])}")
    if max(x.shape[-2:]) <= tile + 2 * ENCODER_PAD_REF:
        device, dtype = _device_dtype(vae.encoder)
        return _quant(vae, vae.encoder(x.to(device, dtype))).to(x.dtype)
    return _encode_tiled(vae, x, tile=tile, tile_batch=tile_batch, offload=offload, on_step=on_step)


def decode_latents(
    vae: nn.Module,
    z: torch.Tensor,
    *,
    tile: int = DECODER_TILE,
    tile_batch: int = 1,
    offload: torch.device | str | TileStore | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Image `decoder(post_quant_conv(z))` of a diffusers `AutoencoderKL`, tiled when large.

    z: (B, latent_channels, h, w), already divided by the scaling factor, any device. Returns (B, 3, 8h, 8w)
    in z.dtype, unclamped (about [-1, 1]). Runs untiled when max(h, w) <= tile + 2·11 (where the reference
    does, spec §1.9); otherwise tiles with cores of at most `tile` latent px. Either way the result equals
    the untiled decoder up to float rounding. `tile_batch`, `offload` and `on_step` as in `encode_moments`.
    """
    _check_4d(z, "z")
    if max(z.shape[-2:]) <= tile + 2 * DECODER_PAD_REF:
        device, dtype = _device_dtype(vae.decoder)
        z_ = z.to(device, dtype)
        if vae.post_quant_conv is not None:
            z_ = vae.post_quant_conv(z_)
        return vae.decoder(z_).to(z.dtype)
    return _decode_tiled(vae, z, tile=tile, tile_batch=tile_batch, offload=offload, on_step=on_step)


def encoder_halo(encoder: nn.Module) -> int:
    """Smallest exact halo of a diffusers `Encoder`, in image px (a multiple of 2**downsamples).

    Walks the layers and tracks `m`, how many px next to a tile's inner edge are wrong at the current
    level: a k×k conv adds k//2; Downsample2D (pad right/bottom by 1, 3×3 conv, stride 2) maps m to
    ceil((m+1)/2) on the right/bottom side (ceil(m/2) on the left/top); GroupNorm, attention (global K/V)
    and 1×1 convs are pointwise in the positions they output. SD-2.1: 112 px.
    """
    m, levels = _reach(encoder.conv_in), 0
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            m += _resnet_reach(resnet)
        for down in block.downsamplers or ():
            _check_downsample(down)
            m, levels = (m + 2) // 2, levels + 1
    m += sum(_resnet_reach(r) for r in encoder.mid_block.resnets)
    m += _reach(encoder.conv_out)
    _check_group_norm(encoder.conv_norm_out)
    return m * 2**levels


def decoder_halo(decoder: nn.Module) -> int:
    """Smallest exact halo of a diffusers `Decoder`, in latent px.

    Same bookkeeping as `encoder_halo`; an Upsample2D (nearest ×2, then a conv) maps m to 2m + reach.
    The final margin, in image px, is divided by 2**upsamples and rounded up. SD-2.1: ceil(138/8) = 18.
    """
    m, levels = _reach(decoder.conv_in), 0
    m += sum(_resnet_reach(r) for r in decoder.mid_block.resnets)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            m += _resnet_reach(resnet)
        for up in block.upsamplers or ():
            _check_upsample(up)
            m, levels = 2 * m + _reach(up.conv), levels + 1
    m += _reach(decoder.conv_out)
    _check_group_norm(decoder.conv_norm_out)
    return cdiv(m, 2**levels)


@dataclass(frozen=True)
class VaeCost:
    """What one tiled (or untiled) VAE pass needs, from the sizes alone (for memory plans and progress bars).

    steps: tile batch steps of the lockstep run (tile batches × passes; 1 untiled). peak: bytes of the
    largest activation of one tile batch (the whole map untiled). states: bytes of all tile states at the
    heaviest sync point, an upper estimate (current activation + residual at the widest level; 0 untiled)."""

    tiled: bool
    steps: int
    peak: int
    states: int


def encode_cost(vae: nn.Module, shape: tuple[int, ...], *, tile: int = ENCODER_TILE, tile_batch: int = 1,
                element_size: int = 2) -> VaeCost:
    """`VaeCost` of `encode_moments` for an input of `shape` (B, 3, H, W), as it would tile it."""
    widest = _widest(vae.encoder, up=False)
    if max(shape[-2:]) <= tile + 2 * ENCODER_PAD_REF:
        return VaeCost(False, 1, shape[0] * widest * shape[2] * shape[3] * element_size, 0)
    scale = 2 ** sum(len(b.downsamplers or ()) for b in vae.encoder.down_blocks)
    tiles = make_tiles(shape[-2:], tile, scale, encoder_halo(vae.encoder), tile_batch, False)
    return _tiled_cost(vae.encoder, tiles, shape[0] * widest * element_size)


def decode_cost(vae: nn.Module, shape: tuple[int, ...], *, tile: int = DECODER_TILE, tile_batch: int = 1,
                element_size: int = 2) -> VaeCost:
    """`VaeCost` of `decode_latents` for latents of `shape` (B, C, h, w), as it would tile them."""
    widest = _widest(vae.decoder, up=True)
    if max(shape[-2:]) <= tile + 2 * DECODER_PAD_REF:
        return VaeCost(False, 1, shape[0] * widest * shape[2] * shape[3] * element_size, 0)
    tiles = make_tiles(shape[-2:], tile, 1, decoder_halo(vae.decoder), tile_batch, False)
    return _tiled_cost(vae.decoder, tiles, shape[0] * widest * element_size)


def _tiled_cost(part: nn.Module, tiles: list[Tile], per_px: int) -> VaeCost:
    """per_px: bytes per input px of one image-tile at the widest level (channels × area ratio × size)."""
    syncs = sum(isinstance(m, nn.GroupNorm) for m in part.modules())
    syncs += sum(a is not None for a in getattr(part.mid_block, "attentions", ()))  # the K/V gathering
    peaks = [t.n * t.geo.axes[0].size * t.geo.axes[1].size * per_px for t in tiles]
    return VaeCost(True, len(tiles) * (syncs + 1), max(peaks), 2 * sum(peaks))


def _widest(part: nn.Module, up: bool) -> int:
    """max over levels of channels × (area of that level / area of the input): the largest activation per
    input px (SD-2.1: decoder 256 channels at 64× the latent's area = 16384; encoder 128 channels at 1×)."""
    area, best = 1.0, _base(part.conv_in).out_channels
    for block in part.up_blocks if up else part.down_blocks:
        for r in block.resnets:
            best = max(best, max(r.in_channels, r.out_channels or r.in_channels) * area)
        for s in (block.upsamplers if up else block.downsamplers) or ():
            area = area * 4 if up else area / 4
            best = max(best, s.channels * area)
    return int(best)


# ----------------------------------------------------------------------------------------------------------
# Sync points: GroupNorm and attention


def _core_stats(norm: nn.GroupNorm, t: Tile):
    """Per tile, image and group: (count, mean, var) of the core, in fp32 at least."""
    h = t.geo.core(t.h).unflatten(1, (norm.num_groups, -1)).unflatten(0, (t.n, -1))  # (n, B, G, C/G, hc, wc)
    fp = torch.promote_types(h.dtype, torch.float32)
    # Low-precision tiles are upcast a few groups at a time so the fp32 copy stays small.
    chunk = norm.num_groups if h.dtype == fp else max(1, norm.num_groups * 2**24 // max(h.numel(), 1))
    var, mean = zip(*(torch.var_mean(c.to(fp), dim=(3, 4, 5), correction=0) for c in h.split(chunk, dim=2)))
    return h[0, 0, 0].numel(), torch.cat(mean, dim=2), torch.cat(var, dim=2)


def _combine_stats(parts) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and biased variance over all cores (Chan et al.'s parallel formula): (B, G) each."""
    acc = torch.float32 if parts[0][1].device.type == "mps" else torch.float64  # MPS has no fp64
    total = sum(count * mean.shape[0] for count, mean, _ in parts)
    mean = sum((m.to(acc) * (c / total)).sum(0) for c, m, _ in parts)
    var = sum(((v.to(acc) + (m.to(acc) - mean) ** 2) * (c / total)).sum(0) for c, m, v in parts)
    return mean, var


def _norm(norm: nn.GroupNorm, t: Tile):
    """t.h = norm(t.h) with statistics over the whole feature map (all cores), the module's eps/affine."""
    t.geo.check_exact()
    mean, var = yield Sync(_core_stats(norm, t), _combine_stats)  # (B, G)
    scale = torch.rsqrt(var + norm.eps).repeat_interleave(t.h.shape[1] // norm.num_groups, dim=1)  # (B, C)
    shift = -mean.repeat_interleave(t.h.shape[1] // norm.num_groups, dim=1) * scale
    if norm.affine:
        scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
    # (B, C) -> (n·B, C, 1, 1), in the tile's dtype
    scale, shift = (v.to(t.h.dtype).repeat(t.n, 1)[:, :, None, None] for v in (scale, shift))
    t.h = torch.addcmul(shift, t.h, scale)


def _concat_kv(parts, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All cores' keys and values: (B, heads, N, d) each, N = positions in the whole feature map."""
    out = []
    for i in range(2):
        kv = torch.cat([p[i].transpose(0, 1).flatten(1, 2) for p in parts], dim=1)  # (B, N, C)
        out.append(kv.unflatten(-1, (heads, -1)).transpose(1, 2))
    return out[0], out[1]


def _core_kv(attn: nn.Module, t: Tile) -> tuple[torch.Tensor, torch.Tensor]:
    core = t.geo.core(t.h).flatten(2).transpose(1, 2)  # (n·B, Lc, C)
    return attn.to_k(core).unflatten(0, (t.n, -1)), attn.to_v(core).unflatten(0, (t.n, -1))  # (n, B, Lc, C)


def _sdpa(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """q (n·B, heads, L, d) against key/value (B, heads, N, d), one tile at a time.

    Whole tiles keep the GPU busy: with d = 512 the memory-efficient kernel takes 32 queries per block,
    and 1k-query chunks left most SMs idle (a 4096² decode spent 8.4 s instead of ~2 s in attention on an
    H200). That kernel and the flash ones need O(L) memory; the 64k cap only bounds a math fallback."""
    tiles = []
    for qt in q.split(key.shape[0]):  # (B, heads, L, d)
        tiles.append(
            torch.cat([F.scaled_dot_product_attention(c, key, value) for c in qt.split(2**16, 2)], 2)
        )
    return torch.cat(tiles)


def _attention(attn: nn.Module, t: Tile):
    """diffusers `Attention` as run by AttnProcessor2_0 (GroupNorm, single-scale SDPA, out-projection,
    residual, rescale), with the keys and values of the whole map. Only the queries are per tile."""
    if attn.spatial_norm is not None or attn.group_norm is None or attn.norm_q is not None:
        raise NotImplementedError("only the VAE mid-block attention (GroupNorm, no q/k norms) is supported")
    t.skip = t.h
    yield from _norm(attn.group_norm, t)
    # No tensor is bound to a local across the yield: the parts are freed once concatenated.
    key, value = yield Sync(_core_kv(attn, t), lambda parts: _concat_kv(parts, attn.heads))
    nB, C, H, W = t.h.shape
    q = attn.to_q(t.h.flatten(2).transpose(1, 2))  # (n·B, L, C)
    o = _sdpa(q.unflatten(-1, (attn.heads, -1)).transpose(1, 2), key, value)  # (n·B, heads, L, d)
    o = o.transpose(1, 2).reshape(nB, H * W, C).to(q.dtype)
    o = attn.to_out[1](attn.to_out[0](o)).transpose(1, 2).reshape(nB, C, H, W)
    if attn.residual_connection:
        o = o + t.skip
    t.h, t.skip = _div(o, attn.rescale_output_factor), None


# ----------------------------------------------------------------------------------------------------------
# Tile programs: the diffusers forward passes, one layer at a time


def _resnet(block: nn.Module, t: Tile):
    """ResnetBlock2D without time embedding: (shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))))))) / s."""
    t.skip = t.h
    yield from _norm(block.norm1, t)
    t.h = block.conv1(block.nonlinearity(t.h))
    t.geo.conv(_reach(block.conv1))
    yield from _norm(block.norm2, t)
    t.h = block.conv2(block.dropout(block.nonlinearity(t.h)))
    t.geo.conv(_reach(block.conv2))
    skip = t.skip if block.conv_shortcut is None else block.conv_shortcut(t.skip)
    t.h, t.skip = _div(skip + t.h, block.output_scale_factor), None


def _mid_block(mid: nn.Module, t: Tile):
    yield from _resnet(mid.resnets[0], t)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            yield from _attention(attn, t)
        yield from _resnet(resnet, t)


def _encoder_program(vae: nn.Module, x: torch.Tensor, device: torch.device, dtype: torch.dtype):
    def program(t: Tile) -> TileProgram:
        enc = vae.encoder
        t.h = _stack(x, t.boxes, device, dtype)  # (n·B, 3, h, w)
        t.h = enc.conv_in(t.h)
        t.geo.conv(_reach(enc.conv_in))
        for block in enc.down_blocks:
            for resnet in block.resnets:
                yield from _resnet(resnet, t)
            for down in block.downsamplers or ():
                t.h = down(t.h)  # pads (0, 1, 0, 1) itself, as untiled
                t.geo.down()
        yield from _mid_block(enc.mid_block, t)
        yield from _norm(enc.conv_norm_out, t)
        t.h = enc.conv_out(enc.conv_act(t.h))
        t.geo.conv(_reach(enc.conv_out))
        t.geo.check_exact()
        return _quant(vae, t.geo.core(t.h))

    return program


def _decoder_program(vae: nn.Module, z: torch.Tensor, device: torch.device, dtype: torch.dtype):
    def program(t: Tile) -> TileProgram:
        dec = vae.decoder
        t.h = _stack(z, t.boxes, device, dtype)  # (n·B, 4, h, w)
        if vae.post_quant_conv is not None:
            t.h = vae.post_quant_conv(t.h)
            t.geo.conv(_reach(vae.post_quant_conv))
        t.h = dec.conv_in(t.h)
        t.geo.conv(_reach(dec.conv_in))
        yield from _mid_block(dec.mid_block, t)
        t.h = t.h.to(_device_dtype(dec.up_blocks)[1])  # diffusers <= 0.2x casts here; a no-op otherwise
        for block in dec.up_blocks:
            for resnet in block.resnets:
                yield from _resnet(resnet, t)
            for up in block.upsamplers or ():
                t.h = up(t.geo.crop_valid(t.h))  # nearest ×2, then conv
                t.geo.up(_reach(up.conv))
        yield from _norm(dec.conv_norm_out, t)
        t.h = dec.conv_out(dec.conv_act(t.h))
        t.geo.conv(_reach(dec.conv_out))
        t.geo.check_exact()
        return t.geo.core(t.h)

    return program


# ----------------------------------------------------------------------------------------------------------
# Tiled entry points (the public functions decide when to use them; tests call them directly)


def _encode_tiled(vae, x, *, tile, tile_batch=1, offload=None, halo: int | None = None, on_step=None) -> torch.Tensor:
    _check_tiling(tile, tile_batch)
    device, dtype = _device_dtype(vae.encoder)
    derived = encoder_halo(vae.encoder)
    scale = 2 ** sum(len(b.downsamplers or ()) for b in vae.encoder.down_blocks)  # 8: cores align to it
    halo, strict = (derived, True) if halo is None else (halo, False)
    tiles = make_tiles(x.shape[-2:], tile, scale, halo, tile_batch, strict)
    out_ch = _base(vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out).out_channels
    store = offload if isinstance(offload, TileStore) else offload_store(device, offload)
    out = torch.empty(x.shape[0], out_ch, x.shape[2] // scale, x.shape[3] // scale, dtype=x.dtype,
                      device=store.out_device or device)  # fmt: skip
    run_lockstep(tiles, _encoder_program(vae, x, device, dtype), store, _paster(out, 1, scale), on_step)
    return out


def _decode_tiled(vae, z, *, tile, tile_batch=1, offload=None, halo: int | None = None, on_step=None) -> torch.Tensor:
    _check_tiling(tile, tile_batch)
    device, dtype = _device_dtype(vae.decoder)
    derived = decoder_halo(vae.decoder)
    scale = 2 ** sum(len(b.upsamplers or ()) for b in vae.decoder.up_blocks)
    halo, strict = (derived, True) if halo is None else (halo, False)
    tiles = make_tiles(z.shape[-2:], tile, 1, halo, tile_batch, strict)
    store = offload if isinstance(offload, TileStore) else offload_store(device, offload)
    out = torch.empty(z.shape[0], _base(vae.decoder.conv_out).out_channels, z.shape[2] * scale, z.shape[3] * scale,
                      dtype=z.dtype, device=store.out_device or device)  # fmt: skip
    run_lockstep(tiles, _decoder_program(vae, z, device, dtype), store, _paster(out, scale, 1), on_step)
    return out


# ----------------------------------------------------------------------------------------------------------
# Small helpers


def _div(x: torch.Tensor, s: float) -> torch.Tensor:
    return x if s == 1 else x / s  # the VAE's factors are 1: skip a full pass over the tile


def _paster(out: torch.Tensor, num: int, den: int):
    """Copy each tile's core result into `out` at its core box scaled by num/den."""

    def paste(t: Tile, result: torch.Tensor) -> None:
        B = out.shape[0]
        for i, (y0, y1, x0, x1) in enumerate(t.cores):
            box = [v * num // den for v in (y0, y1, x0, x1)]
            out[:, :, box[0] : box[1], box[2] : box[3]].copy_(result[i * B : (i + 1) * B])

    return paste


def _stack(x: torch.Tensor, boxes, device, dtype) -> torch.Tensor:
    """The input boxes of a tile batch, stacked: (n·B, C, h, w) on the compute device."""
    return torch.cat([x[:, :, y0:y1, x0:x1].to(device, dtype) for y0, y1, x0, x1 in boxes])


def _quant(vae: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if vae.quant_conv is None:
        return h
    return vae.quant_conv(h.to(_base(vae.quant_conv).weight.dtype))


def _base(module: nn.Module) -> nn.Module:
    """The wrapped layer of a peft LoRA layer, else the module itself."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _reach(conv: nn.Module) -> int:
    """How many px each side a stride-1 'same' conv reads: k//2 (0 for 1×1)."""
    c = _base(conv)
    k = c.kernel_size
    if not isinstance(c, nn.Conv2d) or c.stride != (1, 1) or c.dilation != (1, 1) or c.padding != (k[0] // 2, k[1] // 2) or k[0] != k[1]:  # fmt: skip
        raise NotImplementedError(f"unsupported conv for tiling: {c}")
    return k[0] // 2


def _resnet_reach(block: nn.Module) -> int:
    if block.upsample is not None or block.downsample is not None or block.time_emb_proj is not None:
        raise NotImplementedError("ResnetBlock2D with up/down-sampling or time embedding is not supported")
    return _reach(block.conv1) + _reach(block.conv2)


def _check_downsample(down: nn.Module) -> None:
    c = _base(down.conv)
    if down.norm is not None or down.padding != 0 or c.kernel_size != (3, 3) or c.stride != (2, 2) or c.padding != (0, 0):  # fmt: skip
        raise NotImplementedError("only Downsample2D(padding=0): pad (0, 1, 0, 1) + 3×3 stride-2 conv")


def _check_upsample(up: nn.Module) -> None:
    if up.norm is not None or up.use_conv_transpose or not up.interpolate or not up.use_conv:
        raise NotImplementedError("only Upsample2D with nearest ×2 interpolation and a conv is supported")


def _check_group_norm(norm: nn.Module) -> None:
    if not isinstance(norm, nn.GroupNorm):
        raise NotImplementedError(f"only GroupNorm output norms are supported, not {type(norm).__name__}")


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def _check_tiling(tile: int, tile_batch: int) -> None:
    if tile < 1 or tile_batch < 1:
        raise ValueError(f"tile and tile_batch must be positive, got {tile} and {tile_batch}")


def _check_4d(x: torch.Tensor, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be (B, C, H, W), got shape {tuple(x.shape)}")


__all__ = ["VaeCost", "decode_cost", "decode_latents", "decoder_halo", "encode_cost", "encode_moments", "encoder_halo"]
