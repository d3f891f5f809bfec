"""DAPE / RAM tagger (osediff.dape): checkpoint loading, LoRA merge, thresholds, Swin windows (spec §1.4, App. B).

Everything runs on a tiny random RAM saved in the published key layout; the expected numbers come from a naive
re-statement of the reference written below (per-window loops, explicit bias/mask lookup, unmerged LoRA).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from osediff.dape import RAMConfig, RAMTagger, preprocess, tags_from_logits
from osediff.dape.tagger import interpolate_bias_table

# 64² images, 16² tokens, window 4: stages at 16² and 8² use shifted windows, 4² is one window, 2² a clamped one.
TINY = RAMConfig(image_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4),
                 window_size=4, embed_width=24, hidden_size=32, head_layers=2, head_heads=4, intermediate_size=64,
                 num_classes=7)
NAMES = [f"tag{k}" for k in range(TINY.num_classes)]
R = 8  # LoRA rank of DAPE; lora_alpha = 1, so the scale is 1/8


def random_weights(seed: int) -> dict[str, torch.Tensor]:
    """Random tiny-RAM weights under the tagger's names."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in RAMTagger(TINY, NAMES, [0.5] * 7).state_dict().items():
        t = torch.randn(v.shape, generator=g)
        if "norm" in k.lower() and k.endswith("weight"):
            t = 1 + 0.1 * t
        elif "bias_table" in k:
            t = 0.5 * t
        elif v.ndim >= 2 and k != "label_embed":
            t = t * v[0].numel() ** -0.5
        else:
            t = 0.1 * t if k != "label_embed" else t
        out[k] = t
    return out


def published(weights: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """`weights` as ram_swin_large_14m.pth stores them: head under `vision_multi`, Swin's derived buffers, the
    tied tag_encoder copies (here decoys with other values), and unused BERT entries."""
    g = torch.Generator().manual_seed(seed)
    sd = {k.replace("tagging_head", "vision_multi"): v.clone() for k, v in weights.items()}
    for k, v in weights.items():
        if k.endswith("relative_position_bias_table"):
            n = round(math.sqrt(v.shape[0])) // 2 + 1
            sd[k.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(n**2, n**2).long()
        if k.startswith("tagging_head.encoder.layer."):  # decoys: the vision_multi entry must win
            sd[k.replace("tagging_head", "tag_encoder")] = torch.randn(v.shape, generator=g)
    for j in (1,):
        sd[f"visual_encoder.layers.0.blocks.{j}.attn_mask"] = torch.zeros(16, 16, 16)
    sd["tag_encoder.encoder.layer.5.attention.self.query.weight"] = torch.randn(32, 32, generator=g)
    sd["text_decoder.cls.predictions.bias"] = torch.randn(30524, generator=g)
    sd["vision_multi.encoder.layer.0.attention.self.query.weight"] = torch.randn(32, 32, generator=g)
    sd["vision_multi.embeddings.word_embeddings.weight"] = torch.randn(30524, 32, generator=g)
    return sd


def random_lora(weights: dict[str, torch.Tensor], seed: int = 2) -> dict[str, torch.Tensor]:
    """DAPE.pth-style LoRA (loralib names) with non-zero B for every Swin qkv and head query/key, plus one on a
    tag_encoder query tied to the head (its ΔW lands in the same shared weight)."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for k, w in weights.items():
        module = k[: -len(".weight")]
        if k.endswith("attn.qkv.weight"):
            dim = w.shape[0] // 3
            lora[f"{module}.lora_A"] = 0.3 * torch.randn(2 * R, w.shape[1], generator=g)
            lora[f"{module}.lora_B"] = 0.3 * torch.randn(2 * dim, R, generator=g)
        elif k.endswith(("self.query.weight", "self.key.weight")):
            lora[f"{module}.lora_A"] = 0.3 * torch.randn(R, w.shape[1], generator=g)
            lora[f"{module}.lora_B"] = 0.3 * torch.randn(w.shape[0], R, generator=g)
    tied = "tag_encoder.encoder.layer.0.crossattention.self.query"
    lora[f"{tied}.lora_A"] = 0.3 * torch.randn(R, 32, generator=g)
    lora[f"{tied}.lora_B"] = 0.3 * torch.randn(32, R, generator=g)
    return lora


# ------------------------------------------------------------------- the reference, restated naively (no osediff)

def lin(x, w, b=None, lora=None, qv=False):
    """nn.Linear, plus loralib's unmerged LoRA: x·Aᵀ·Bᵀ/8, into all rows (Linear) or the q and v blocks."""
    y = x @ w.T + (0 if b is None else b)
    if lora is not None:
        a, bb = lora
        if qv:
            d = bb.shape[0] // 2
            y = y + torch.cat([x @ a[:R].T @ bb[:d].T / R, torch.zeros_like(y[..., :d]), x @ a[R:].T @ bb[d:].T / R],
                              -1)
        else:
            y = y + x @ a.T @ bb.T / R
    return y


def ln(x, sd, p, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def ref_window_attention(y, sd, p, heads, w, s, lora):
    """y: (B, Rs, Rs, C), already rolled by -s. Loops over windows; bias by offset, mask by band."""
    B, Rs, _, C = y.shape
    table = sd[p + "relative_position_bias_table"]
    band = [0 if r < Rs - w else (1 if r < Rs - s else 2) for r in range(Rs)] if s else [0] * Rs
    out = torch.zeros_like(y)
    for wy in range(0, Rs, w):
        for wx in range(0, Rs, w):
            rows = [wy + i // w for i in range(w * w)]
            cols = [wx + i % w for i in range(w * w)]
            t = y[:, rows, cols]  # (B, N, C)
            qkv = lin(t, sd[p + "qkv.weight"], sd[p + "qkv.bias"], lora.get(p + "qkv"), qv=True)
            q, k, v = qkv.split(C, -1)
            dy = torch.tensor(rows)[:, None] - torch.tensor(rows)[None, :]
            dx = torch.tensor(cols)[:, None] - torch.tensor(cols)[None, :]
            bias = table[(dy + w - 1) * (2 * w - 1) + dx + w - 1]  # (N, N, heads)
            region = torch.tensor([band[r] * 3 + band[c] for r, c in zip(rows, cols)])
            mask = (region[:, None] != region[None, :]).float() * -100.0
            hd = C // heads
            o = []
            for h in range(heads):
                qh, kh, vh = (z[..., h * hd:(h + 1) * hd] for z in (q, k, v))
                o.append(torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(hd) + bias[..., h] + mask, -1) @ vh)
            out[:, rows, cols] = lin(torch.cat(o, -1), sd[p + "proj.weight"], sd[p + "proj.bias"])
    return out


def ref_logits(sd, images, lora=None):
    lora = {} if lora is None else {k[: -len(".lora_A")]: (lora[k], lora[k[:-1] + "B"])
                                    for k in lora if k.endswith("lora_A")}
    c = TINY
    x = F.interpolate(images, size=(c.image_size,) * 2, mode="bilinear", align_corners=False)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = F.conv2d(x, sd["visual_encoder.patch_embed.proj.weight"], sd["visual_encoder.patch_embed.proj.bias"],
                 stride=c.patch_size)
    B, Rs = x.shape[0], x.shape[-1]
    x = ln(x.flatten(2).transpose(1, 2), sd, "visual_encoder.patch_embed.norm")
    for i, depth in enumerate(c.depths):
        dim = c.embed_dim * 2**i
        for j in range(depth):
            p = f"visual_encoder.layers.{i}.blocks.{j}."
            w, s = (c.window_size, 0 if j % 2 == 0 else c.window_size // 2) if Rs > c.window_size else (Rs, 0)
            y = torch.roll(ln(x, sd, p + "norm1").view(B, Rs, Rs, dim), (-s, -s), (1, 2))
            y = torch.roll(ref_window_attention(y, sd, p + "attn.", c.num_heads[i], w, s, lora), (s, s), (1, 2))
            x = x + y.reshape(B, -1, dim)
            hid = F.gelu(lin(ln(x, sd, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
            x = x + lin(hid, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        if i < len(c.depths) - 1:
            g = x.view(B, Rs, Rs, dim)
            x = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1)
            Rs //= 2
            x = ln(x.reshape(B, Rs * Rs, 4 * dim), sd, f"visual_encoder.layers.{i}.downsample.norm")
            x = x @ sd[f"visual_encoder.layers.{i}.downsample.reduction.weight"].T
    x = ln(x, sd, "visual_encoder.norm")
    img = lin(torch.cat([x.mean(1, keepdim=True), x], 1), sd["image_proj.weight"], sd["image_proj.bias"])
    h = torch.relu(lin(sd["label_embed"], sd["wordvec_proj.weight"], sd["wordvec_proj.bias"])).repeat(B, 1, 1)
    for i in range(c.head_layers):
        p = f"tagging_head.encoder.layer.{i}."
        a = p + "crossattention."
        q = lin(h, sd[a + "self.query.weight"], sd[a + "self.query.bias"], lora.get(a + "self.query"))
        k = lin(img, sd[a + "self.key.weight"], sd[a + "self.key.bias"], lora.get(a + "self.key"))
        if i == 0 and "tag_encoder.encoder.layer.0.crossattention.self.query" in lora:  # tied: both ΔW apply
            q = q + lin(h, torch.zeros_like(sd[a + "self.query.weight"]), None,
                        lora["tag_encoder.encoder.layer.0.crossattention.self.query"])
        v = lin(img, sd[a + "self.value.weight"], sd[a + "self.value.bias"])
        hd = c.hidden_size // c.head_heads
        o = torch.cat([torch.softmax(q[..., n * hd:(n + 1) * hd] @ k[..., n * hd:(n + 1) * hd].transpose(1, 2)
                                     / math.sqrt(hd), -1) @ v[..., n * hd:(n + 1) * hd]
                       for n in range(c.head_heads)], -1)
        h = ln(h + lin(o, sd[a + "output.dense.weight"], sd[a + "output.dense.bias"]), sd, a + "output.LayerNorm",
               1e-12)
        f = F.gelu(lin(h, sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"]))
        h = ln(h + lin(f, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"]), sd, p + "output.LayerNorm",
               1e-12)
    return lin(h, sd["fc.weight"], sd["fc.bias"]).squeeze(-1)


# -------------------------------------------------------------------------------------------------------- tests

def save_ram(tmp_path, sd, name="ram.pth"):
    path = tmp_path / name
    torch.save({"model": sd, "optimizer": {}, "epoch": 3}, path)
    return path


def load(ram, dape=None):
    return RAMTagger.from_files(ram, dape, config=TINY, tag_names=NAMES, thresholds=[0.5] * 7)


def test_loads_published_layout_and_matches_reference(tmp_path):
    weights = random_weights(0)
    sd = published(weights)
    # One head entry only in its tied tag_encoder copy: RAM's weight tying makes that copy the loaded value.
    key = "tagging_head.encoder.layer.1.intermediate.dense.weight"
    del sd[key.replace("tagging_head", "vision_multi")]
    sd[key.replace("tagging_head", "tag_encoder")] = weights[key]
    tagger = load(save_ram(tmp_path, sd))

    assert set(tagger.state_dict()) == set(weights)  # no tag_encoder/text_decoder/index/mask/self-attention
    assert not tagger.training and not any(p.requires_grad for p in tagger.parameters())
    images = torch.rand(2, 3, 50, 70, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(tagger.logits(images), ref_logits(weights, images), atol=1e-5, rtol=1e-5)


def test_dape_lora_merge_equals_unmerged_loralib(tmp_path):
    weights = random_weights(0)
    lora = random_lora(weights)
    dape = {**lora, "fc.bias": torch.tensor([0.25]),  # full weights in DAPE.pth overwrite RAM's (strict=False)
            "text_decoder.bert.encoder.layer.0.attention.self.query.lora_A": torch.randn(R, 32)}
    torch.save(dape, tmp_path / "DAPE.pth")
    tagger = load(save_ram(tmp_path, published(weights)), tmp_path / "DAPE.pth")
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))

    qkv = "visual_encoder.layers.2.blocks.1.attn.qkv"
    m = tagger.get_submodule(qkv)
    want = lin(x[:, :m.in_features], weights[qkv + ".weight"], weights[qkv + ".bias"],
               (lora[qkv + ".lora_A"], lora[qkv + ".lora_B"]), qv=True)
    torch.testing.assert_close(m(x[:, :m.in_features]), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(m(x[:, :m.in_features]), lin(x[:, :m.in_features], weights[qkv + ".weight"],
                                                           weights[qkv + ".bias"]), atol=1e-3)
    for name, extra in [("tagging_head.encoder.layer.0.crossattention.self.query",
                         "tag_encoder.encoder.layer.0.crossattention.self.query"),
                        ("tagging_head.encoder.layer.1.crossattention.self.key", None)]:
        m = tagger.get_submodule(name)
        xi = x[:, :m.in_features]
        want = lin(xi, weights[name + ".weight"], weights[name + ".bias"], (lora[name + ".lora_A"], lora[name + ".lora_B"]))
        if extra:
            want = want + xi @ lora[extra + ".lora_A"].T @ lora[extra + ".lora_B"].T / R
        torch.testing.assert_close(m(xi), want, atol=1e-5, rtol=1e-5)

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(tagger.logits(images), ref_logits({**weights, "fc.bias": dape["fc.bias"]}, images, lora),
                               atol=1e-4, rtol=1e-4)
    plain = load(tmp_path / "ram.pth")  # dape_path=None is plain RAM
    torch.testing.assert_close(plain.logits(images), ref_logits(weights, images), atol=1e-5, rtol=1e-5)


def test_bias_table_of_other_window_is_resized(tmp_path):
    weights = random_weights(0)
    sd = published(weights)
    key = "visual_encoder.layers.0.blocks.0.attn.relative_position_bias_table"
    sd[key] = torch.randn(5 * 5, 2)  # a window-3 table; the model's window is 4 (7x7 offsets)
    tagger = load(save_ram(tmp_path, sd))
    got = tagger.state_dict()[key]
    assert got.shape == (49, 2)
    torch.testing.assert_close(got, interpolate_bias_table(sd[key], 7))


def test_missing_and_foreign_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--ram PATH") as e:
        load(tmp_path / "nope.pth")
    assert "ram_swin_large_14m.pth" in str(e.value) and "nope.pth" in str(e.value)
    sd = published(random_weights(0))
    ram = save_ram(tmp_path, sd)
    with pytest.raises(FileNotFoundError, match=r"--dape PATH") as e:
        load(ram, tmp_path / "DAPE.pth")
    assert "preset/models/DAPE.pth" in str(e.value)

    head_key = "encoder.layer.1.output.dense.bias"  # gone from the head and its tied tag_encoder copy
    del sd["fc.weight"], sd["vision_multi." + head_key], sd["tag_encoder." + head_key]
    with pytest.raises(ValueError, match=r"lacks 2 weight\(s\).*(fc\.weight|output\.dense\.bias)") as e:
        load(save_ram(tmp_path, sd, "broken.pth"))
    assert "broken.pth" in str(e.value)

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        load(tmp_path / "junk.pth")
    torch.save({"lora_A": torch.zeros(1)}, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="not a RAM checkpoint.*--dape"):
        load(tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="not a DAPE checkpoint.*--ram"):
        load(ram, ram)
    with pytest.raises(ValueError, match="no LoRA"):
        load(ram, tmp_path / "plain.pth")
    torch.save({"model": {"something.else": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="none of the RAM tagger's weights"):
        load(tmp_path / "other.pth")


def test_threshold_is_strict_and_tags_in_index_order():
    thresholds = torch.full((7,), 0.5)
    tagger = RAMTagger(TINY, NAMES, thresholds).eval()
    with torch.no_grad():
        tagger.fc.weight.zero_()
        tagger.fc.bias.fill_(0.3)  # every logit is exactly 0.3
    p = torch.sigmoid(torch.tensor(0.3))  # float32, as the model computes it
    just_below = torch.nextafter(p, torch.tensor(0.0))
    tagger.thresholds = torch.stack([p, p - 1e-4, p + 1e-4, torch.tensor(0.0), p, torch.tensor(1.0), just_below])
    assert tagger(torch.rand(2, 3, 40, 40)) == ["tag1, tag3, tag6"] * 2  # at the threshold: off; above: on

    th = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.5, 0.5, 0.2])
    logits = torch.tensor([[-9.0] * 7,  # none
                           [-9, -9, -9, 2, -9, -9, -9],  # one
                           [3.0, 9, -9, -9, 0.5, -9, -1]])  # many; tag6 (prob .27 > .2) last though least sure
    assert tags_from_logits(logits, th, NAMES) == ["", "tag3", "tag0, tag1, tag4, tag6"]
    assert tags_from_logits(logits.half(), th, NAMES) == ["", "tag3", "tag0, tag1, tag4, tag6"]


def test_preprocess_is_bilinear_without_antialias_and_squashes():
    x = torch.rand(1, 3, 128, 256, generator=torch.Generator().manual_seed(6))
    # Halving with align_corners=False samples exactly between pixel pairs, so bilinear = 2x2 mean; an antialiased
    # resize would use a wider kernel, align_corners=True other sample points.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    want = (F.avg_pool2d(x, kernel_size=(1, 2)) - mean) / std  # 128x256 -> 128x128: only the width halves
    torch.testing.assert_close(preprocess(x, 128, torch.float32), want)
    assert preprocess(x.half(), 128, torch.bfloat16).dtype == torch.bfloat16


def test_batch_composition_does_not_change_results(tmp_path):
    tagger = load(save_ram(tmp_path, published(random_weights(0))))
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    together = tagger.logits(images)
    for b in range(3):
        torch.testing.assert_close(tagger.logits(images[b:b + 1])[0], together[b], atol=1e-5, rtol=1e-5)


def test_shifted_window_attention_does_not_leak_across_the_wrap():
    tagger = RAMTagger(TINY, NAMES, [0.5] * 7).eval()
    block = tagger.visual_encoder.layers[0].blocks[1]  # 16² tokens, window 4, shift 2
    Rs, w, s = block.resolution, block.window, block.shift
    assert (Rs, w, s) == (16, 4, 2)
    # Which tokens may see token (0, 0)? Those in its window after the roll by -s, and in the same band there.
    roll = lambda r: (r - s) % Rs  # noqa: E731  (original -> rolled coordinate)
    band = lambda r: 0 if r < Rs - w else (1 if r < Rs - s else 2)  # noqa: E731
    py, px = roll(0), roll(0)
    same_window, allowed = set(), set()
    for y in range(Rs):
        for x in range(Rs):
            ry, rx = roll(y), roll(x)
            if (ry // w, rx // w) == (py // w, px // w):
                same_window.add((y, x))
                if (band(ry), band(rx)) == (band(py), band(px)):
                    allowed.add((y, x))
    assert allowed < same_window  # the wrapped window mixes regions, so a missing mask would show
    with torch.no_grad():
        x = torch.randn(1, Rs * Rs, 16, generator=torch.Generator().manual_seed(8))
        x2 = x.clone()
        x2[0, 0] += torch.randn(16, generator=torch.Generator().manual_seed(9))  # perturb token (0, 0)
        changed = (block(x2) - block(x)).abs().amax(-1)[0].view(Rs, Rs) > 1e-6
    assert {(int(y), int(x)) for y, x in changed.nonzero()} == allowed


def test_runs_in_bfloat16(tmp_path):
    tagger = load(save_ram(tmp_path, published(random_weights(0))))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    want = tagger.logits(images)
    half = RAMTagger.from_files(tmp_path / "ram.pth", config=TINY, tag_names=NAMES, thresholds=[0.5] * 7,
                                dtype=torch.bfloat16)
    got = half.logits(images)
    assert got.dtype == torch.bfloat16 and half.thresholds.dtype == torch.float32
    torch.testing.assert_close(got.float(), want, atol=0.15, rtol=0.05)
    assert len(half(images)) == 2
    with pytest.raises(ValueError, match="float"):
        half(torch.zeros(2, 64, 64))


def test_full_size_layout_matches_ram_swin_large():
    with torch.device("meta"):
        tagger = RAMTagger()
    sd = tagger.state_dict()
    assert len(tagger.tag_names) == 4585 and tagger.thresholds.shape == (4585,)
    for key, shape in [("visual_encoder.patch_embed.proj.weight", (192, 3, 4, 4)),
                       ("visual_encoder.layers.2.blocks.17.attn.relative_position_bias_table", (529, 24)),
                       ("visual_encoder.layers.3.blocks.1.attn.qkv.weight", (4608, 1536)),
                       ("visual_encoder.layers.2.downsample.reduction.weight", (1536, 3072)),
                       ("visual_encoder.norm.weight", (1536,)), ("image_proj.weight", (512, 1536)),
                       ("label_embed", (4585, 512)), ("wordvec_proj.weight", (768, 512)),
                       ("tagging_head.encoder.layer.1.crossattention.self.key.weight", (768, 512)),
                       ("tagging_head.encoder.layer.1.output.LayerNorm.bias", (768,)), ("fc.weight", (1, 768))]:
        assert sd[key].shape == shape, key
    assert "visual_encoder.layers.3.downsample.reduction.weight" not in sd
    last = tagger.visual_encoder.layers[3].blocks[1]
    assert (last.window, last.shift) == (12, 0)  # 12² tokens: one window, no shift, as the reference
    with torch.no_grad():
        assert tagger.visual_encoder(torch.empty(2, 3, 384, 384, device="meta")).shape == (2, 145, 1536)


def test_import_is_light():
    code = ("import sys, osediff.dape; heavy = {'transformers', 'diffusers', 'peft', 'torchvision', 'timm'}"
            " & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
