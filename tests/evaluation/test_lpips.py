"""LPIPS-VGG (spec §4.6) with random weights: CPU, no network."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from osediff.evaluation import lpips as L
from osediff.evaluation.lpips import LPIPS, scale_input, unit_normalise

CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # conv layers of torchvision's vgg16.features


@pytest.fixture(scope="module")
def model() -> LPIPS:
    torch.manual_seed(0)
    m = LPIPS()
    for head in m.heads():  # the released heads are non-negative; random ones need not be
        head.weight.abs_()
    return m


def images(seed: int, b: int = 2, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def test_distance_properties(model):
    x, y = images(0), images(1)
    d = model(x, y)
    assert d.shape == (2,) and d.dtype == torch.float32
    assert torch.all(d > 0)
    torch.testing.assert_close(model(y, x), d)
    torch.testing.assert_close(model(x, x), torch.zeros(2), atol=1e-7, rtol=0)


def test_gradients_reach_the_input_only(model):
    x = images(2).requires_grad_(True)
    model(x, images(3)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_stays_in_eval_mode(model):
    wrapper = torch.nn.ModuleDict({"lpips": model}).train()
    assert not model.training and not any(m.training for m in model.modules())
    x, y = images(4), images(5)
    assert torch.equal(model(x, y), model(x, y))  # dropout off
    del wrapper


def test_normalisation_math():
    f = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)
    torch.testing.assert_close(unit_normalise(f).flatten(), torch.tensor([0.6, 0.8]))
    zero = torch.zeros(1, 3, 1, 1)
    expected = torch.tensor([0.030 / 0.458, 0.088 / 0.448, 0.188 / 0.450])
    torch.testing.assert_close(scale_input(zero).flatten(), expected)
    torch.testing.assert_close(scale_input(torch.ones(1, 3, 1, 1)).flatten(),
                               torch.tensor([1.030 / 0.458, 1.088 / 0.448, 1.188 / 0.450]))


def test_forward_is_the_lpips_sum(model):
    """Recompute d = Σ_l mean_hw w_l · (f̂_l(x) − f̂_l(y))² layer by layer from the trunk."""
    x, y = images(6, b=1), images(7, b=1)
    fx, fy = scale_input(x), scale_input(y)
    expected = torch.zeros(1)
    for i, layer in enumerate(model.features):
        fx, fy = layer(fx), layer(fy)
        if i in L.TAPS:
            diff = (unit_normalise(fx) - unit_normalise(fy)) ** 2
            w = model.heads()[L.TAPS.index(i)].weight.view(1, -1, 1, 1)
            expected += (diff * w).sum(1).mean(dim=(1, 2))
    assert [f.shape[1] for f in model.taps(x)] == list(L.CHANNELS)
    torch.testing.assert_close(model(x, y), expected, rtol=1e-5, atol=1e-7)


def _released_layout(seed: int) -> tuple[dict, dict]:
    """State dicts shaped like torchvision's vgg16-397923af.pth and lpips' v0.1 vgg.pth."""
    g = torch.Generator().manual_seed(seed)
    vgg, c_in = {}, 3
    for idx, c_out in zip(CONV_INDICES, (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)):
        vgg[f"features.{idx}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * 0.01
        vgg[f"features.{idx}.bias"] = torch.randn(c_out, generator=g) * 0.01
        c_in = c_out
    vgg["classifier.6.weight"] = torch.zeros(10, 4)  # the classifier is ignored
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(L.CHANNELS)}
    return vgg, lin


def test_state_dict_layout_and_loading():
    m = LPIPS()
    expected = {f"features.{i}.{p}" for i in CONV_INDICES for p in ("weight", "bias")}
    expected |= {f"lin{k}.model.1.weight" for k in range(5)}
    assert set(m.state_dict()) == expected
    vgg, lin = _released_layout(1)
    m.load_weights(vgg, lin)
    assert torch.equal(m.features[28].bias, vgg["features.28.bias"])
    assert torch.equal(m.lin3.model[1].weight, lin["lin3.model.1.weight"])
    with pytest.raises(ValueError, match="lin4.model.1.weight"):
        m.load_weights(vgg, {k: v for k, v in lin.items() if not k.startswith("lin4")})


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """(vgg16 file, lpips heads file, the heads' state dict), written once."""
    folder = tmp_path_factory.mktemp("weights")
    vgg, lin = _released_layout(2)
    torch.save(vgg, folder / "vgg16.pth")
    torch.save(lin, folder / "vgg.pth")
    return folder / "vgg16.pth", folder / "vgg.pth", lin


def test_from_files_reads_local_files(weight_files):
    vgg_path, lin_path, lin = weight_files
    m = LPIPS.from_files(vgg_path, lin_path)
    assert torch.equal(m.lin0.model[1].weight, lin["lin0.model.1.weight"])
    with pytest.raises(FileNotFoundError):
        LPIPS.from_files(vgg_path.with_name("missing.pth"), lin_path)


@pytest.fixture
def empty_hub(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def test_offline_without_cache_names_both_files(empty_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: pytest.fail("no download when offline"))
    with pytest.raises(RuntimeError) as err:
        LPIPS.from_files()
    msg = str(err.value)
    assert L.VGG16_URL in msg and L.LPIPS_VGG_URL in msg and "vgg_path" in msg and "lin_path" in msg


def test_download_failure_and_cache_hit(empty_hub, weight_files, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(url, **kw):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", unreachable)
    with pytest.raises(RuntimeError, match="download of .* failed"):
        LPIPS.from_files()
    # files already in the hub cache are used without any download
    vgg_path, lin_path, lin = weight_files
    (empty_hub / "checkpoints").mkdir(parents=True)
    (empty_hub / "checkpoints" / "vgg16-397923af.pth").symlink_to(vgg_path)
    (empty_hub / "checkpoints" / L.LPIPS_VGG_FILE).symlink_to(lin_path)
    m = LPIPS.from_files()
    assert torch.equal(m.lin2.model[1].weight, lin["lin2.model.1.weight"])
