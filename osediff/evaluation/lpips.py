"""LPIPS-VGG v0.1 perceptual distance (Zhang et al., CVPR 2018), the training loss of spec §4.6.

Equivalent to the `lpips` package's `LPIPS(net='vgg', version='0.1')` with inputs in [-1, 1]:

    d(x, y) = Σ_l mean_{h,w} w_l · (f̂_l(x) − f̂_l(y))²

- the inputs pass through lpips' scaling layer `(x − shift) / scale` (ImageNet statistics mapped to [-1, 1]);
- `f_l` are the VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (torchvision's `vgg16().features`
  indices 3, 8, 15, 22, 29), and `f̂_l = f_l / (‖f_l‖₂ over channels + 1e-10)`;
- `w_l ≥ 0` are the learned 1×1 heads of lpips' `weights/v0.1/vgg.pth`.

Parameter names match the two public files, so they load as they are: the trunk as `features.{i}.weight/bias`
(torchvision `vgg16-397923af.pth`) and the heads as `lin{l}.model.1.weight` (lpips `vgg.pth`, where
`model.0` is a Dropout). The module is frozen and stays in eval mode.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

log = logging.getLogger(__name__)

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_VGG_URL = "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/vgg.pth"
LPIPS_VGG_FILE = "lpips_v0.1_vgg.pth"  # cache name; lpips' own "vgg.pth" is too generic for the hub cache

# lpips v0.1 ScalingLayer constants (per RGB channel).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# VGG16 convolutions up to conv5_3: (output channels, index in torchvision's `features`); "M" = 2×2 max-pool.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
CHANNELS = (64, 128, 256, 512, 512)


def scale_input(x: Tensor) -> Tensor:
    """lpips v0.1 input scaling `(x − shift) / scale` of (B, 3, H, W) images in [-1, 1]."""
    shift = torch.tensor(SHIFT, dtype=x.dtype, device=x.device)[:, None, None]
    scale = torch.tensor(SCALE, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - shift) / scale


def unit_normalise(f: Tensor, eps: float = 1e-10) -> Tensor:
    """Divide (B, C, H, W) features by their L2 norm over channels (+ eps), as lpips' `normalize_tensor`."""
    return f / (torch.sqrt((f * f).sum(dim=1, keepdim=True)) + eps)


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features[:30]` (through relu5_3) in plain torch, with the same module indices."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c_in = v
    return nn.Sequential(*layers)


class _LinearHead(nn.Module):
    """One lpips head, `model = Sequential(Dropout, Conv2d(C, 1, 1, bias=False))`, named as in the file."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


class LPIPS(nn.Module):
    """LPIPS-VGG v0.1. `forward(x, y)`: x, y (B, 3, H, W) in [-1, 1] -> (B,) distances.

    (The `lpips` package returns (B, 1, 1, 1); `.mean()` of either gives the same loss.) Parameters never
    require grad, but gradients flow to the inputs. Built with random weights; `from_files` loads the real ones.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg16_features()
        for i, c in enumerate(CHANNELS):
            self.add_module(f"lin{i}", _LinearHead(c))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Always eval: the heads' Dropout must stay off, even inside a module put in train mode."""
        return super().train(False)

    def heads(self) -> list[nn.Conv2d]:
        return [getattr(self, f"lin{i}").model[1] for i in range(len(CHANNELS))]

    def taps(self, x: Tensor) -> list[Tensor]:
        """The five VGG activations of already-scaled inputs, (B, C_l, H / 2^l, W / 2^l)."""
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected two (B, 3, H, W) tensors of one shape, got {tuple(x.shape)}, "
                             f"{tuple(y.shape)}")
        b = x.shape[0]
        feats = self.taps(scale_input(torch.cat([x, y])))  # one trunk pass for both images
        total = x.new_zeros(b, dtype=torch.float32)
        for f, head in zip(feats, self.heads()):
            f = unit_normalise(f.float())  # float32: a sum of 512 squares can overflow fp16
            diff = (f[:b] - f[b:]) ** 2
            total = total + head(diff.to(head.weight.dtype)).float().mean(dim=(1, 2, 3))
        return total

    def load_weights(self, vgg_state: dict[str, Tensor], lin_state: dict[str, Tensor]) -> None:
        """Load torchvision's vgg16 state dict (its `classifier.*` is ignored) and lpips' head weights."""
        trunk = {k: v for k, v in vgg_state.items() if k.startswith("features.")}
        heads = {k: v for k, v in lin_state.items() if k.startswith("lin")}
        if extra := set(lin_state) - set(heads):
            log.debug("ignoring non-head keys in the lpips weights: %s", sorted(extra))
        own = set(self.state_dict())
        trunk = {k: v for k, v in trunk.items() if k in own}  # features.30 (last pool) has no weights
        missing = own - set(trunk) - set(heads)
        unexpected = set(heads) - own
        if missing or unexpected:
            raise ValueError(f"LPIPS weights do not match: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")
        self.load_state_dict({**trunk, **heads})

    @classmethod
    def from_files(cls, vgg_path: str | Path | None = None, lin_path: str | Path | None = None,
                   map_location: str | torch.device = "cpu") -> LPIPS:
        """LPIPS with the ImageNet VGG16 trunk and the lpips v0.1 heads.

        Each path that is None is fetched once into the torch hub cache (`torch.hub.get_dir()/checkpoints`) from
        VGG16_URL / LPIPS_VGG_URL. Files are read with `weights_only=True`.
        """
        model = cls()
        vgg = _load(vgg_path, VGG16_URL, "vgg16-397923af.pth", map_location)
        lin = _load(lin_path, LPIPS_VGG_URL, LPIPS_VGG_FILE, map_location)
        model.load_weights(vgg, lin)
        return model


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _unavailable(reason: str) -> RuntimeError:
    return RuntimeError(
        f"LPIPS weights are not available ({reason}). Two files are needed:\n"
        f"  VGG16 trunk (torchvision):  {VGG16_URL}\n"
        f"  lpips v0.1 heads (vgg.pth): {LPIPS_VGG_URL}\n"
        "Download both on a connected machine and pass them as LPIPS.from_files(vgg_path=..., lin_path=...), "
        f"or place them in {Path(torch.hub.get_dir()) / 'checkpoints'} as 'vgg16-397923af.pth' and "
        f"'{LPIPS_VGG_FILE}'.")


def _load(path: str | Path | None, url: str, file_name: str,
          map_location: str | torch.device) -> dict[str, Tensor]:
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"LPIPS weights file not found: {path}")
        return torch.load(path, map_location=map_location, weights_only=True)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if cached.is_file():
        return torch.load(cached, map_location=map_location, weights_only=True)
    if _offline():
        raise _unavailable(f"HF_HUB_OFFLINE is set and {cached} is missing")
    log.info("downloading %s to %s", url, cached)
    try:
        # torchvision's file name carries its hash prefix; the lpips file has none to check.
        return torch.hub.load_state_dict_from_url(url, map_location=map_location, file_name=file_name,
                                                  check_hash=file_name.startswith("vgg16-"), weights_only=True)
    except Exception as e:  # URLError, HTTPError, hash mismatch, truncated file...
        raise _unavailable(f"download of {url} failed: {e}") from e
