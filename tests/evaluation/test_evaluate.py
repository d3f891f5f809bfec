"""`osediff eval`: pairing by name, outputs, report, reproduce mode and the pyiqa adapter (spec §5)."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from osediff.commands import evaluate as command
from osediff.evaluation.evaluate import (
    ALL_METRICS,
    Pair,
    PairingError,
    evaluate,
    format_table,
    load_learned_metrics,
    pair_images,
    parse_metrics,
    read_rgb,
)
from osediff.evaluation.report import render_report, worst_window

REALSR = Path(__file__).resolve().parents[3] / "shared" / "benchmarks" / "realsr"


def save(path: Path, seed: int, size=(24, 20)) -> Path:
    """A random RGB image of `size` (W, H), written losslessly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def folders(tmp_path: Path, names=("a", "b", "c")) -> tuple[Path, Path, Path]:
    """SR, HR, LR folders: SR = HR with noise on every image but the first, LR = 4x smaller."""
    sr, hr, lr = tmp_path / "sr", tmp_path / "hr", tmp_path / "lr"
    for i, name in enumerate(names):
        save(hr / f"{name}.png", i, size=(32, 28))
        save(lr / f"{name}.png", 100 + i, size=(8, 7))
        if i == 0:
            sr.mkdir(exist_ok=True)
            shutil.copy(hr / f"{name}.png", sr / f"{name}.png")
        else:
            save(sr / f"{name}.png", 50 + i, size=(32, 28))
    return sr, hr, lr


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(list(argv)))


# ---------------------------------------------------------------------------------------------- pairing
def test_pairs_by_stem_across_formats(tmp_path):
    hr, sr = tmp_path / "hr", tmp_path / "sr"
    for i, name in enumerate(("x", "Y", "z")):
        save(hr / f"{name}.png", i)
    sr.mkdir()
    for name, ext in (("x", ".bmp"), ("Y", ".png"), ("z", ".tif")):  # lossless, other formats, same stems
        Image.open(hr / f"{name}.png").save(sr / f"{name}{ext}")
    (sr / "notes.txt").write_text("not an image")  # ignored: not an image extension
    pairs = pair_images(sr, hr)
    assert [p.name for p in pairs] == ["Y", "x", "z"]
    assert all(p.sr.stem == p.hr.stem == p.name for p in pairs)
    ev = evaluate([sr], hr, ("psnr", "ssim"), progress=False)
    assert ev.methods[0].values["psnr"] == pytest.approx([80.0] * 3)
    assert ev.methods[0].values["ssim"] == pytest.approx([1.0] * 3)


def test_missing_extra_and_size_mismatch_are_listed(tmp_path):
    sr, hr, _ = folders(tmp_path, names=("a", "b", "c", "d"))
    (sr / "b.png").unlink()  # missing
    save(sr / "zz_extra.png", 9)  # extra
    save(sr / "c.png", 9, size=(30, 28))  # wrong size
    with pytest.raises(PairingError) as err:
        pair_images(sr, hr)
    text = str(err.value)
    assert "1 HR image(s) have no SR image" in text and "b" in text
    assert "1 SR image(s) have no HR image" in text and "zz_extra" in text
    assert "size mismatch for 'c'" in text and "30x28" in text and "32x28" in text
    assert len(err.value.problems) == 3


def test_duplicate_stems_and_empty_folders_are_errors(tmp_path):
    sr, hr, _ = folders(tmp_path)
    save(sr / "a.jpg", 3)
    with pytest.raises(PairingError, match="two files for 'a'"):
        pair_images(sr, hr)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PairingError, match="no images in the SR folder"):
        pair_images(tmp_path / "empty", hr)
    with pytest.raises(PairingError, match="not a folder"):
        pair_images(tmp_path / "nope", hr)


def test_cli_refuses_a_wrong_pairing(tmp_path, caplog):
    sr, hr, _ = folders(tmp_path)
    (sr / "c.png").unlink()
    with caplog.at_level(logging.ERROR):
        rc = cli("--sr", str(sr), "--hr", str(hr), "--out", str(tmp_path / "out"))
    assert rc == 1
    assert "have no SR image" in caplog.text and "Nothing was averaged" in caplog.text
    assert not (tmp_path / "out" / "per_image.csv").exists()


def test_missing_lr_only_blanks_the_report(tmp_path, caplog):
    sr, hr, lr = folders(tmp_path)
    (lr / "b.png").unlink()
    with caplog.at_level(logging.WARNING):
        pairs = pair_images(sr, hr, lr)
    assert [p.lr is None for p in pairs] == [False, True, False] and "no LR image" in caplog.text
    ev = evaluate([sr], hr, ("psnr",), lr_dir=lr, progress=False)
    assert "(no LR)" in render_report(ev, top_k=3, crop=16)


# ---------------------------------------------------------------------------------------------- options
def test_parse_metrics():
    assert parse_metrics("SSIM, psnr") == ("psnr", "ssim")
    assert parse_metrics("all") == ALL_METRICS
    with pytest.raises(ValueError, match="unknown metric"):
        parse_metrics("psnr,lpisp")


@pytest.mark.parametrize("argv", [
    ["--hr", "H"],  # neither --sr nor --base/--weights
    ["--sr", "S", "--hr", "H", "--weights", "w"],  # both modes
    ["--sr", "S", "--hr", "H", "--metrics", "psnr,bogus"],
    ["--lr", "L", "--hr", "H", "--weights", "w"],  # reproduce mode without --base
])
def test_usage_errors_exit_2(argv, caplog):
    with caplog.at_level(logging.ERROR):
        assert cli(*argv) == 2
    assert caplog.text


def test_dry_run_prints_options_and_pairing(tmp_path, capsys):
    sr, hr, _ = folders(tmp_path)
    assert cli("--sr", str(sr), "--hr", str(hr), "--dry-run") == 0
    out = capsys.readouterr().out
    assert '"mode": "score"' in out and "3 pairs" in out and "eval_sr" in out


# ---------------------------------------------------------------------------------------------- outputs
def test_cli_writes_table_csv_summary_and_report(tmp_path, capsys):
    sr, hr, lr = folders(tmp_path)
    out = tmp_path / "out"
    assert cli("--sr", str(sr), "--hr", str(hr), "--lr", str(lr), "--out", str(out), "--crop", "16") == 0
    table = capsys.readouterr().out
    assert "PSNR↑" in table and "mean" in table and "80.0000" in table

    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert [r["image"] for r in rows] == ["a", "b", "c"] and rows[0]["method"] == "sr"
    assert float(rows[0]["psnr"]) == pytest.approx(80.0) and float(rows[0]["ssim"]) == pytest.approx(1.0)

    summary = json.loads((out / "summary.json").read_text())
    means = summary["methods"]["sr"]["means"]
    assert means["psnr"] == pytest.approx(np.mean([float(r["psnr"]) for r in rows]))
    assert "in-house" in summary["versions"]["psnr"] and "numpy" in summary["versions"]["ssim"]
    assert summary["n_images"] == 3 and summary["unavailable"] == {}
    assert "rounded" in summary["protocol"]["ssim"] and summary["config"]["metrics"] == ["psnr", "ssim"]
    assert {"evaluate", "report"} <= summary["seconds"].keys()

    report = (out / "report.html").read_text()
    assert all(name in report for name in ("a", "b", "c"))
    assert report.count("data:image/png;base64,") >= 2 * 2 * 3  # best+worst rows × 2 metrics × LR|SR|HR
    assert "LR (input)" in report and "Per-image plots" in report


def test_compare_puts_two_methods_side_by_side(tmp_path):
    sr, hr, _ = folders(tmp_path)
    other = tmp_path / "authors"
    shutil.copytree(hr, other)  # a perfect "method"
    out = tmp_path / "out"
    assert cli("--sr", str(sr), "--hr", str(hr), "--compare", str(other), "--out", str(out), "-q") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"sr", "authors"}
    assert summary["methods"]["authors"]["means"]["psnr"] == pytest.approx(80.0)
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert len(rows) == 6 and {r["method"] for r in rows} == {"sr", "authors"}
    report = (out / "report.html").read_text()
    assert "SR: sr" in report and "SR: authors" in report


def test_compare_folder_is_paired_too(tmp_path, caplog):
    sr, hr, _ = folders(tmp_path)
    other = tmp_path / "other"
    save(other / "a.png", 1, size=(32, 28))
    with caplog.at_level(logging.ERROR):
        assert cli("--sr", str(sr), "--hr", str(hr), "--compare", str(other), "--out", str(tmp_path / "o")) == 1
    assert "2 HR image(s) have no SR image" in caplog.text


def test_report_without_matplotlib_says_so(tmp_path, monkeypatch):
    sr, hr, _ = folders(tmp_path)
    ev = evaluate([sr], hr, ("psnr", "ssim"), progress=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    html = render_report(ev, crop=16)
    assert "matplotlib is not installed" in html and all(n in html for n in ("a", "b", "c"))


def test_format_table_and_worst_window():
    err = np.zeros((40, 30))
    err[25:35, 12:20] = 1.0
    r, c = worst_window(err, 16)
    assert r <= 25 and r + 16 >= 35 and c <= 12 and c + 16 >= 20
    assert worst_window(np.ones((8, 8)), 16) == (0, 0)  # crop larger than the image: the whole image


def test_benchmark_subset_end_to_end_matches_the_log(tmp_path):
    # Three RealSR images through the CLI: the CSV holds the logged values (spec §5.2).
    names = ("Canon_001_LR4", "Nikon_021_LR4", "Nikon_050_LR4")
    for sub in ("osediff", "HR", "LR"):
        (tmp_path / sub).mkdir()
        for n in names:
            (tmp_path / sub / f"{n}.png").symlink_to(REALSR / sub / f"{n}.png")
    logged = {}
    for line in (REALSR / "osediff_metrics.log").read_text().splitlines():
        for n in names:
            if f"/{n}.png |" in line:
                logged[n] = tuple(float(line.split(f"{k}: ")[1].split(";")[0]) for k in ("PSNR", "SSIM", "NIQE"))
    out = tmp_path / "out"
    assert cli("--sr", str(tmp_path / "osediff"), "--hr", str(tmp_path / "HR"), "--lr", str(tmp_path / "LR"),
               "--out", str(out), "--no-report", "--metrics", "psnr,ssim,niqe") == 0
    for row in csv.DictReader((out / "per_image.csv").open()):
        assert float(row["psnr"]) == pytest.approx(logged[row["image"]][0], abs=1e-4)
        assert float(row["ssim"]) == pytest.approx(logged[row["image"]][1], abs=1e-4)
        assert float(row["niqe"]) == pytest.approx(logged[row["image"]][2], abs=1e-4)
    implementations = json.loads((out / "summary.json").read_text())["implementations"]
    assert implementations["niqe"]["backend"] == "in-house" and "basicsr" in implementations["niqe"]["licence"]
    assert not (out / "report.html").exists()


# ---------------------------------------------------------------------------------------------- reproduce mode
def fake_batch(monkeypatch, rc: int = 0) -> list[dict]:
    """Install a fake `osediff.core.batch` whose super_resolve_files upsamples each LR image 4x with PIL."""
    calls: list[dict] = []

    def super_resolve_files(inputs, output_dir, *, base, weights, dape=None, ram=None, device=None, dtype=None):
        calls.append(dict(inputs=inputs, output_dir=output_dir, base=base, weights=weights, dape=dape, ram=ram,
                          device=device, dtype=dtype))
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        for p in inputs:
            with Image.open(p) as im:
                im.resize((im.width * 4, im.height * 4), Image.BICUBIC).save(Path(output_dir) / (Path(p).stem + ".png"))
        return rc

    module = types.ModuleType("osediff.core.batch")
    module.super_resolve_files = super_resolve_files
    monkeypatch.setitem(sys.modules, "osediff.core.batch", module)
    return calls


def test_reproduce_mode_runs_sr_then_evaluates(tmp_path, monkeypatch):
    _, hr, lr = folders(tmp_path)
    calls = fake_batch(monkeypatch)
    out = tmp_path / "table"
    rc = cli("--lr", str(lr), "--hr", str(hr), "--base", "sd21", "--weights", "w.safetensors",
             "--dtype", "fp16", "--device", "cpu", "--out", str(out), "--crop", "16")
    assert rc == 0
    (call,) = calls
    assert call["output_dir"] == str(out / "sr") and [Path(p).name for p in call["inputs"]] == ["a.png", "b.png", "c.png"]
    assert (call["base"], call["weights"], call["dtype"], call["device"], call["dape"]) == \
        ("sd21", "w.safetensors", "fp16", "cpu", None)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["mode"] == "reproduce" and "sr" in summary["seconds"]
    assert summary["methods"]["sr"]["sr_dir"] == str(out / "sr")
    assert "LR (input)" in (out / "report.html").read_text()


def test_reproduce_mode_stops_when_sr_fails(tmp_path, monkeypatch):
    _, hr, lr = folders(tmp_path)
    fake_batch(monkeypatch, rc=5)
    out = tmp_path / "table"
    assert cli("--lr", str(lr), "--hr", str(hr), "--base", "b", "--weights", "w", "--out", str(out)) == 5
    assert not (out / "per_image.csv").exists()


# ---------------------------------------------------------------------------------------------- pyiqa adapter
def test_without_pyiqa_the_in_house_metrics_still_run(tmp_path, monkeypatch, caplog):
    sr, hr, _ = folders(tmp_path)
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # import pyiqa -> ImportError
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        rc = cli("--sr", str(sr), "--hr", str(hr), "--metrics", "psnr,ssim,lpips,fid", "--out", str(out))
    assert rc == 3
    assert "pip install 'osediff[eval]'" in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["unavailable"]) == {"lpips", "fid"} and summary["metrics_computed"] == ["psnr", "ssim"]
    assert "pyiqa is not installed" in summary["unavailable"]["lpips"]
    assert "Not computed" in (out / "report.html").read_text()


class FakeMetric:
    """Stands in for a pyiqa metric: records its calls, returns a tensor like pyiqa does."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __call__(self, *args):
        import torch

        self.log.append((self.name, args))
        if self.name == "fid":
            return 12.5
        return torch.tensor([[float(args[0].mean())]])


def fake_pyiqa(monkeypatch, fail: set[str] = frozenset()) -> list:
    pytest.importorskip("torch")
    calls: list = []
    module = types.ModuleType("pyiqa")
    module.__version__ = "9.9.9"

    def create_metric(name, device=None, **kwargs):
        if name in fail:
            raise ConnectionError("no network")
        return FakeMetric(name, calls)

    module.create_metric = create_metric
    monkeypatch.setitem(sys.modules, "pyiqa", module)
    return calls


def test_pyiqa_adapter_wiring_with_a_fake_pyiqa(tmp_path, monkeypatch):
    sr, hr, _ = folders(tmp_path)
    calls = fake_pyiqa(monkeypatch)
    ev = evaluate([sr], hr, ALL_METRICS, device="cpu", progress=False)
    by_metric = {}
    for name, args in calls:
        by_metric.setdefault(name, []).append(args)
    assert set(by_metric) == {"lpips", "dists", "musiq", "maniqa-pipal", "clipiqa", "fid"}  # NIQE is in-house
    assert all(len(a) == 2 for a in by_metric["lpips"] + by_metric["dists"])  # full reference: (sr, hr)
    assert all(len(a) == 1 for a in by_metric["musiq"] + by_metric["maniqa-pipal"])  # no reference
    lpips_sr = by_metric["lpips"][1][0]
    assert tuple(lpips_sr.shape) == (1, 3, 28, 32) and str(lpips_sr.dtype) == "torch.float32"
    assert float(lpips_sr.max()) <= 1 and float(lpips_sr.min()) >= 0
    assert by_metric["fid"] == [(str(hr), str(sr))]
    r = ev.methods[0]
    assert r.dataset_values == {"fid": 12.5} and len(r.values["musiq"]) == 3
    assert r.values["musiq"][1] == pytest.approx(float(read_rgb(sr / "b.png").mean()), abs=1e-6)
    assert ev.versions["lpips"].startswith("pyiqa 9.9.9") and "in-house" in ev.versions["psnr"]
    assert "FID↓" in format_table(ev) and ev.computed == list(ALL_METRICS)
    assert all(np.isnan(r.values["niqe"]))  # 32×28 images hold no 96×96 block
    assert ev.sources()["lpips"]["backend"] == "pyiqa" and "CC BY-NC-SA 4.0" in ev.sources()["lpips"]["licence"]
    assert ev.sources()["niqe"]["backend"] == "in-house" and ev.sources()["niqe"]["comparable_with_paper"]


def test_missing_weights_offline_names_the_download(tmp_path, monkeypatch):
    fake_pyiqa(monkeypatch, fail={"maniqa-pipal"})
    metrics, versions, unavailable = load_learned_metrics(["psnr", "lpips", "maniqa"], device="cpu")
    assert set(metrics) == {"lpips"} and set(versions) == {"lpips"}
    assert "could not create 'maniqa-pipal'" in unavailable["maniqa"] and "pyiqa" in unavailable["maniqa"]
    assert "network access" in unavailable["maniqa"]


def test_real_pyiqa_lpips_matches_the_log(tmp_path):
    """Runs only where pyiqa is installed and its LPIPS weights are already cached (no download in tests)."""
    try:
        import pyiqa  # noqa: F401
        import torch
    except ImportError as e:
        pytest.skip(f"pyiqa (osediff[eval]) is not installed: {e}")
    cache = Path(torch.hub.get_dir()) / "pyiqa"
    if not cache.is_dir() or not any(cache.iterdir()):
        pytest.skip(f"no pyiqa weights cached in {cache}")
    metrics, versions, unavailable = load_learned_metrics(["lpips"], device="cpu")
    if "lpips" in unavailable:
        pytest.skip(f"LPIPS weights unavailable: {unavailable['lpips']}")
    name = "Canon_001_LR4"
    pair = Pair(name, REALSR / "osediff" / f"{name}.png", REALSR / "HR" / f"{name}.png")
    value = metrics["lpips"](read_rgb(pair.sr), read_rgb(pair.hr))
    assert value == pytest.approx(0.224819, abs=1e-3)  # the authors' log (spec §5.2)
    assert versions["lpips"].startswith("pyiqa ")


# ---------------------------------------------------------------------------------------------- permissive backend
def lpips_files(tmp_path: Path) -> tuple[Path, Path]:
    """A random LPIPS-VGG saved as the two public files' layouts (torchvision trunk, lpips heads)."""
    import torch

    from osediff.evaluation.lpips import LPIPS

    torch.manual_seed(0)
    state = LPIPS().state_dict()
    vgg, lin = tmp_path / "vgg16.pth", tmp_path / "heads.pth"
    torch.save({k: v for k, v in state.items() if k.startswith("features.")}, vgg)
    torch.save({k: v.abs() for k, v in state.items() if k.startswith("lin")}, lin)
    return vgg, lin


def test_permissive_backend_lpips_vgg_in_house_and_licences(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # the permissive backend never touches pyiqa
    sr, hr, _ = folders(tmp_path)
    vgg, lin = lpips_files(tmp_path)
    out = tmp_path / "out"
    rc = cli("--sr", str(sr), "--hr", str(hr), "--metrics", "psnr,lpips,musiq", "--backend", "permissive",
             "--lpips-vgg", str(vgg), "--lpips-lin", str(lin), "--out", str(out), "--crop", "16")
    assert rc == 3  # musiq has no permissive implementation
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    lpips = [float(r["lpips"]) for r in rows]
    assert lpips[0] == pytest.approx(0, abs=1e-6) and min(lpips[1:]) > 0  # image a is HR itself
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "permissive"
    impl = summary["implementations"]
    assert impl["lpips"]["comparable_with_paper"] is False and "BSD-2-Clause" in impl["lpips"]["licence"]
    assert impl["psnr"]["backend"] == "in-house" and impl["musiq"]["implementation"] is None
    assert "no permissively licensed implementation of musiq" in summary["unavailable"]["musiq"]
    report = (out / "report.html").read_text()
    assert "implementations and licences (backend permissive)" in report and "AlexNet" in report


def test_permissive_lpips_without_weights_says_where_they_go(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("OSEDIFF_MODELS", str(tmp_path / "models"))
    for env in ("OSEDIFF_LPIPS_VGG", "OSEDIFF_LPIPS_LIN"):
        monkeypatch.delenv(env, raising=False)
    metrics, _, unavailable = load_learned_metrics(["lpips"], backend="permissive", device="cpu")
    assert not metrics
    why = unavailable["lpips"]
    assert "--lpips-vgg" in why and "OSEDIFF_LPIPS_LIN" in why and "vgg16-397923af.pth" in why


def test_permissive_adapters_with_fake_libraries(tmp_path, monkeypatch):
    """DISTS_pytorch and torchmetrics are not installed here: fakes at the import boundary check what our
    adapters pass them (tensor shapes, ranges, real/fake split). The real libraries are not run by this test."""
    import torch

    calls: list = []

    class FakeDISTS(torch.nn.Module):
        def forward(self, x, y, require_grad=False, batch_average=True):
            calls.append(("dists", tuple(x.shape), batch_average, float(x.min()), float(x.max())))
            return (x - y).abs().mean(dim=(1, 2, 3))

    class FakeCLIPIQA(torch.nn.Module):
        def __init__(self, model_name_or_path, data_range, prompts):
            super().__init__()
            calls.append(("clipiqa-init", model_name_or_path, data_range, prompts))

        def forward(self, x):
            return x.mean()

    class FakeFID(torch.nn.Module):
        def __init__(self, feature, normalize):
            super().__init__()
            self.n = {True: 0, False: 0}
            calls.append(("fid-init", feature, normalize))

        def update(self, x, real):
            assert x.dtype == torch.float32 and x.ndim == 4 and 0 <= float(x.min()) and float(x.max()) <= 1
            self.n[real] += 1

        def compute(self):
            return torch.tensor(float(self.n[True] * 10 + self.n[False]))

    dists_mod = types.ModuleType("DISTS_pytorch")
    dists_mod.DISTS = FakeDISTS
    tm, tm_mm, tm_img, tm_fid = (types.ModuleType(n) for n in ("torchmetrics", "torchmetrics.multimodal",
                                                                 "torchmetrics.image", "torchmetrics.image.fid"))
    tm_mm.CLIPImageQualityAssessment = FakeCLIPIQA
    tm_fid.FrechetInceptionDistance = FakeFID
    for name, mod in (("DISTS_pytorch", dists_mod), ("torchmetrics", tm), ("torchmetrics.multimodal", tm_mm),
                      ("torchmetrics.image", tm_img), ("torchmetrics.image.fid", tm_fid)):
        monkeypatch.setitem(sys.modules, name, mod)
    sr, hr, _ = folders(tmp_path)
    ev = evaluate([sr], hr, ("psnr", "dists", "clipiqa", "fid"), backend="permissive", device="cpu",
                  progress=False)
    assert not ev.unavailable and ev.methods[0].values["dists"][0] == 0
    dists_calls = [c for c in calls if c[0] == "dists"]
    assert len(dists_calls) == 3 and all(c[1:3] == ((1, 3, 28, 32), False) for c in dists_calls)
    assert all(0 <= c[3] and c[4] <= 1 for c in dists_calls)  # images in [0, 1], as DISTS_pytorch expects
    assert ("clipiqa-init", "clip_iqa", 1.0, ("quality",)) in calls and ("fid-init", 2048, True) in calls
    assert ev.methods[0].dataset_values["fid"] == 33  # 3 real (HR) and 3 fake (SR) images
    assert "torchmetrics" in ev.versions["fid"] and ev.sources()["fid"]["comparable_with_paper"] is False


def test_permissive_backend_with_a_failing_download(monkeypatch):
    import torch

    class Offline(torch.nn.Module):
        def __init__(self):
            raise ConnectionError("no network")

    module = types.ModuleType("DISTS_pytorch")
    module.DISTS = Offline
    monkeypatch.setitem(sys.modules, "DISTS_pytorch", module)
    _, _, unavailable = load_learned_metrics(["dists"], backend="permissive", device="cpu")
    assert "ConnectionError: no network" in unavailable["dists"] and "torch hub cache" in unavailable["dists"]


def test_permissive_backend_without_its_libraries(monkeypatch):
    for name in ("DISTS_pytorch", "torchmetrics", "torchmetrics.image", "torchmetrics.image.fid"):
        monkeypatch.setitem(sys.modules, name, None)
    metrics, _, unavailable = load_learned_metrics(["dists", "fid", "niqe"], backend="permissive", device="cpu")
    assert not metrics and set(unavailable) == {"dists", "fid"}
    assert all("osediff[eval-permissive]" in why for why in unavailable.values())


def test_without_pyiqa_the_message_lists_the_in_house_metrics(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)
    _, _, unavailable = load_learned_metrics(["lpips"], device="cpu")
    assert "psnr, ssim and niqe are in-house" in unavailable["lpips"] and "--backend permissive" in unavailable["lpips"]
