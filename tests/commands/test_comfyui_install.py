"""`osediff comfyui install` on fake ComfyUI trees: which Python it finds, the pip command it gives that Python
(recorded by a fake interpreter), the pack linked or copied into custom_nodes/, and --dry-run doing nothing."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from osediff.cli import main

REPO = Path(__file__).resolve().parents[2]


def fake_comfyui(root: Path, python: str | None = "venv/bin/python") -> tuple[Path, Path | None]:
    """A ComfyUI folder (main.py, custom_nodes/) and, at `python` relative to root, a fake interpreter that
    appends its arguments to calls.jsonl beside it and exits 0 (or the code in FAIL beside it)."""
    comfy = root / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    (comfy / "main.py").write_text("")
    if python is None:
        return comfy, None
    py = root / python
    py.parent.mkdir(parents=True, exist_ok=True)
    py.write_text("#!/bin/sh\n"
                  f'printf "%s\\n" "$*" >> "{py.parent}/calls.txt"\n'
                  f'[ -f "{py.parent}/FAIL" ] && exit 3\n'
                  "exit 0\n")
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    return comfy, py


def calls(py: Path) -> list[str]:
    f = py.parent / "calls.txt"
    return f.read_text().splitlines() if f.exists() else []


def test_dry_run_prints_the_steps_and_does_nothing(tmp_path, capsys):
    comfy, py = fake_comfyui(tmp_path)
    assert main(["comfyui", "install", str(comfy), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and str(py) in out
    assert f"{py} -m pip install -e {REPO}" in out  # this checkout, editable
    assert f"{comfy / 'custom_nodes' / 'ComfyUI-OSEDiff'} -> {REPO / 'comfyui'}" in out
    assert calls(py) == [] and list((comfy / "custom_nodes").iterdir()) == []


def test_install_runs_pip_in_comfyuis_python_and_links_the_pack(tmp_path, capsys):
    comfy, py = fake_comfyui(tmp_path)
    assert main(["comfyui", "install", str(comfy)]) == 0
    assert calls(py) == [f"-m pip install -e {REPO}"]
    target = comfy / "custom_nodes" / "ComfyUI-OSEDiff"
    assert target.is_symlink() and target.resolve() == (REPO / "comfyui").resolve()
    assert (target / "example_workflows").is_dir()  # where ComfyUI looks for a pack's templates
    out = capsys.readouterr().out
    assert "pack linked" in out
    # again: the link is kept, pip runs again (an upgrade), no --force needed
    assert main(["comfyui", "install", str(comfy)]) == 0
    assert len(calls(py)) == 2 and "already linked" in capsys.readouterr().out


def test_portable_build_copy_and_name(tmp_path):
    comfy, py = fake_comfyui(tmp_path, "python_embeded/python.exe")
    # the portable build's folder above ComfyUI/ is accepted too
    assert main(["comfyui", "install", str(tmp_path), "--copy", "--name", "OSEDiff-nodes"]) == 0
    assert calls(py) == [f"-m pip install -e {REPO}"]
    target = comfy / "custom_nodes" / "OSEDiff-nodes"
    assert target.is_dir() and not target.is_symlink()
    assert (target / "nodes.py").read_text() == (REPO / "comfyui" / "nodes.py").read_text()
    assert not list(target.rglob("__pycache__"))


def test_python_given_and_failures(tmp_path, caplog):
    comfy, _ = fake_comfyui(tmp_path, None)
    assert main(["comfyui", "install", str(comfy), "--dry-run"]) == 2
    assert "--python" in caplog.text
    _, py = fake_comfyui(tmp_path / "elsewhere", "bin/python3")
    assert main(["comfyui", "install", str(comfy), "--python", str(py)]) == 0
    assert calls(py) == [f"-m pip install -e {REPO}"]
    # taken target without --force; the name osediff; not a ComfyUI; pip failing links nothing
    assert main(["comfyui", "install", str(comfy), "--python", str(py), "--copy"]) == 2
    assert "--force" in caplog.text
    assert main(["comfyui", "install", str(comfy), "--python", str(py), "--name", "osediff"]) == 2
    assert main(["comfyui", "install", str(tmp_path / "nothing"), "--python", str(py)]) == 2
    (py.parent / "FAIL").write_text("")
    assert main(["comfyui", "install", str(comfy), "--python", str(py), "--name", "other"]) == 3
    assert not os.path.lexists(comfy / "custom_nodes" / "other")


def test_force_replaces_a_copy_with_a_link(tmp_path):
    comfy, py = fake_comfyui(tmp_path)
    assert main(["comfyui", "install", str(comfy), "--copy"]) == 0
    assert main(["comfyui", "install", str(comfy), "--force"]) == 0
    assert (comfy / "custom_nodes" / "ComfyUI-OSEDiff").is_symlink()


def test_installed_wheel_installs_the_version_and_needs_the_pack(tmp_path, monkeypatch, caplog):
    from osediff import __version__
    from osediff.commands import comfyui

    comfy, py = fake_comfyui(tmp_path)
    monkeypatch.setattr(comfyui, "checkout_root", lambda: None)
    assert main(["comfyui", "install", str(comfy), "--dry-run"]) == 2
    assert "--pack" in caplog.text
    assert main(["comfyui", "install", str(comfy), "--pack", str(REPO / "comfyui")]) == 0
    assert calls(py) == [f"-m pip install osediff=={__version__}"]


def test_example_workflows_hold_the_nodes_by_their_ids():
    """ComfyUI serves custom_nodes/<pack>/example_workflows/*.json as the pack's templates."""
    files = sorted((REPO / "comfyui" / "example_workflows").glob("*.json"))
    assert files
    for f in files:
        nodes = json.loads(f.read_text())["nodes"]
        assert {"OSEDiffLoader", "OSEDiffUpscale"} <= {n["type"] for n in nodes}


def test_the_packs_registry_metadata_follows_osediff():
    """comfyui/pyproject.toml (read by ComfyUI and the Registry) names this osediff's version everywhere."""
    import tomllib

    from osediff import __version__

    meta = tomllib.loads((REPO / "comfyui" / "pyproject.toml").read_text())
    assert meta["project"]["version"] == __version__
    assert meta["project"]["dependencies"] == [f"osediff=={__version__}"]
    assert (REPO / "comfyui" / "requirements.txt").read_text().split() == [f"osediff=={__version__}"]
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"].startswith(">=")
    assert (REPO / "comfyui" / comfy["Icon"]).is_file()
    assert "comfyui" not in meta["project"]["name"].lower()  # the Registry's rule for node ids
