"""Fetching a weight into the models folder, safely: nothing appears under its final name unless it is complete,
matches its published checksum (where one is known) and passes its structural check (`weights.check`).

A download goes to `<models>/.partial/`, resumes there with an HTTP Range request when re-run (or when the
connection is cut mid-file), and is renamed into place only at the end. Plain URLs (GitHub, Google Drive) use
the standard library with short, stated time-outs (`OSEDIFF_DOWNLOAD_TIMEOUT`, default 10 s per connect or
read), so an offline machine fails within seconds per source; Hugging Face repositories go through
`huggingface_hub`, which brings its own resume, cache, `HF_ENDPOINT`, tokens and proxies.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from html import unescape
from pathlib import Path

from osediff.weights import check, locate
from osediff.weights.sources import (
    SD_CONFIGS,
    SD_TOKENIZER,
    SD_WEIGHTS,
    HFFile,
    Source,
    URLFile,
    describe,
    human,
)
from osediff.weights.sources import sources as all_sources

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
CHUNK = 1 << 20


class DownloadError(OSError):
    """A weight could not be fetched; the message names the source and the network or checksum error."""


def is_offline(flag: bool | None = None) -> bool:
    """`--offline`, or HF_HUB_OFFLINE / OSEDIFF_OFFLINE set to a true value: never touch the network."""
    if flag:
        return True
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("OSEDIFF_OFFLINE", "HF_HUB_OFFLINE"))


def default_timeout() -> float:
    return float(os.environ.get("OSEDIFF_DOWNLOAD_TIMEOUT", DEFAULT_TIMEOUT))


def partial_dir(models: Path) -> Path:
    return models / ".partial"


# ----------------------------------------------------------------------------------------------- plain URLs

def _open(url: str, start: int, timeout: float):
    req = urllib.request.Request(url, headers={"User-Agent": "osediff", **({"Range": f"bytes={start}-"} if start else {})})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # the partial file is already complete
            return None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"{url}: {type(reason).__name__}: {reason} (time-out {timeout:g} s)") from None


def _gdrive_confirm(url: str, resp, timeout: float) -> str:
    """Google Drive answers a large file with an HTML page whose form carries a confirmation token; return the
    URL that form submits to. A page without such a form (quota exceeded, file removed) is an error."""
    html = resp.read(1 << 20).decode("utf-8", "replace")
    form = re.search(r'<form[^>]*action="([^"]+)"', html)
    if not form:
        title = re.search(r"<title>(.*?)</title>", html, re.S)
        raise DownloadError(f"{url}: Google Drive did not serve the file ({(title.group(1) if title else 'an HTML page').strip()})")
    fields = dict(re.findall(r'<input[^>]*type="hidden"[^>]*name="([^"]+)"[^>]*value="([^"]*)"', html))
    action = urllib.parse.urljoin(url, unescape(form.group(1)))
    return f"{action}{'&' if '?' in action else '?'}{urllib.parse.urlencode(fields)}"


def fetch_url(url: str, dest: Path, *, kind: str = "http", blob_sha1: str | None = None,
              verify: Callable[[Path], None] | None = None, timeout: float | None = None, attempts: int = 3,
              progress: bool = True) -> Path:
    """Download `url` to `dest` through `<dest folder>/.partial/<name>.part`; see the module docstring.

    A cut connection resumes (Range) up to `attempts` times as long as each try brings new bytes. On a
    checksum or structure failure the partial file is deleted; on a network failure it is kept for resuming.
    """
    from tqdm import tqdm

    timeout = default_timeout() if timeout is None else timeout
    part = partial_dir(dest.parent) / f"{dest.name}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    tries = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        resp = _open(url, have, timeout)
        if resp is not None and kind == "gdrive" and resp.headers.get_content_type() == "text/html":
            url = _gdrive_confirm(url, resp, timeout)
            resp.close()
            resp = _open(url, have, timeout)
        if resp is None:
            break
        with resp:
            if have and resp.status != 206:  # the server ignored Range: start again
                have = 0
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            if tries == 0:
                log.info("%s: %s%s", dest.name, human(total), f", resuming at {have:,} bytes" if have else "")
            got = 0
            try:
                with open(part, "ab" if have else "wb") as f, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                        disable=not progress, leave=False) as bar:
                    while block := resp.read(CHUNK):
                        f.write(block)
                        got += len(block)
                        bar.update(len(block))
                if total is not None and have + got < total:
                    raise http.client.IncompleteRead(b"", total - have - got)
            except (http.client.IncompleteRead, TimeoutError, ConnectionError) as e:
                tries += 1
                if got == 0 or tries >= attempts:
                    raise DownloadError(f"{url}: connection lost after {have + got:,} bytes ({type(e).__name__}; "
                                        f"time-out {timeout:g} s); re-run to resume") from None
                log.info("%s: connection lost after %s bytes, resuming", dest.name, f"{have + got:,}")
                continue
        break
    _finish(part, dest, blob_sha1, verify)
    return dest


def _finish(part: Path, dest: Path, blob_sha1: str | None, verify: Callable[[Path], None] | None) -> None:
    """Checksum, structure, then the rename: the only way a file reaches its final name."""
    if blob_sha1 is not None and (got := check.blob_sha1(part)) != blob_sha1:
        part.unlink()
        raise DownloadError(f"{dest.name}: checksum mismatch (git blob {got}, published {blob_sha1}); deleted")
    if verify is not None:
        try:
            verify(part)
        except check.BrokenWeightsError as e:
            _remove(part)
            raise DownloadError(f"{dest.name}: the downloaded file is broken ({e}); deleted") from None
    _remove(dest)
    os.replace(part, dest)


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


# ---------------------------------------------------------------------------------------------- Hugging Face

def _hf_error(origin: str, e: Exception, timeout: float) -> DownloadError:
    first = (str(e).splitlines() or [""])[0][:200]
    return DownloadError(f"{origin}: {type(e).__name__}: {first} (time-out {timeout:g} s)")


def _probe(timeout: float) -> None:
    """Fail within `timeout` when the Hub cannot be reached: huggingface_hub itself retries a failed request
    with back-off for ~30 s. Skipped behind a proxy, where only the proxy knows the way."""
    import socket

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise DownloadError(f"{url.hostname}:{port} unreachable ({type(e).__name__}: {e}; time-out {timeout:g} s)")\
            from None


def fetch_hf_file(origin: HFFile, dest: Path, *, verify: Callable[[Path], None] | None = None,
                  timeout: float | None = None) -> Path:
    """One file of a Hugging Face repository via `huggingface_hub.hf_hub_download` into the partial folder."""
    import huggingface_hub

    timeout = default_timeout() if timeout is None else timeout
    tmp = partial_dir(dest.parent) / dest.name
    _probe(timeout)
    try:
        got = huggingface_hub.hf_hub_download(origin.repo, origin.filename, repo_type=origin.repo_type,
                                              local_dir=tmp, etag_timeout=timeout)
    except Exception as e:  # huggingface_hub raises many kinds (HTTP, offline, not found, time-out)
        raise _hf_error(describe(origin), e, timeout) from None
    part = partial_dir(dest.parent) / f"{dest.name}.part"
    os.replace(got, part)
    shutil.rmtree(tmp, ignore_errors=True)
    _finish(part, dest, None, verify)
    return dest


def base_files(listing: dict[str, int | None]) -> dict[str, str]:
    """{file in the repository: name in our folder} for SD 2.1-base: configs, tokenizer, and one safetensors
    per network (fp32 if the mirror has it, else fp16, renamed to the plain name diffusers loads)."""
    chosen = {f: f for f in listing if f in SD_CONFIGS or (f.startswith(SD_TOKENIZER) and f.count("/") == 1)}
    for sub, names in SD_WEIGHTS.items():
        have = [n for n in names if f"{sub}/{n}" in listing]
        if not have:
            raise DownloadError(f"the repository has none of {', '.join(f'{sub}/{n}' for n in names)}")
        chosen[f"{sub}/{have[0]}"] = f"{sub}/{names[0]}"
    return chosen


def fetch_hf_base(repo: str, dest: Path, *, timeout: float | None = None) -> Path:
    """SD 2.1-base from one mirror: list its files (with sizes), fetch only what the four folders need."""
    import huggingface_hub

    timeout = default_timeout() if timeout is None else timeout
    try:
        _probe(timeout)
        info = huggingface_hub.HfApi().model_info(repo, files_metadata=True, timeout=timeout)
        listing = {s.rfilename: s.size for s in info.siblings or []}
        files = base_files(listing)
        size = sum(listing[f] or 0 for f in files)
        log.info("downloading SD 2.1-base from huggingface.co %s (%s) into %s", repo, human(size), dest)
        tmp = partial_dir(dest.parent) / dest.name
        huggingface_hub.snapshot_download(repo, allow_patterns=list(files), local_dir=tmp, etag_timeout=timeout)
    except DownloadError as e:
        raise DownloadError(f"huggingface.co {repo}: {e}") from None
    except Exception as e:
        raise _hf_error(f"huggingface.co {repo}", e, timeout) from None
    for src, name in files.items():
        if src != name:
            os.replace(tmp / src, tmp / name)
    shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's resume bookkeeping
    try:
        check.check_base(tmp)
    except check.BrokenWeightsError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(f"huggingface.co {repo}: the downloaded folder is broken ({e}); deleted") from None
    _remove(dest)
    os.replace(tmp, dest)
    return dest


# --------------------------------------------------------------------------------------------------- one call

def download(key: str, models: str | os.PathLike | None = None, *, force: bool = False, offline: bool | None = None,
             timeout: float | None = None, progress: bool = True) -> Path:
    """Fetch weight `key` ("base", "weights", "face", "ram", "dape") into the models folder; returns its path.

    Already there (and not `force`): nothing is fetched. Each source is tried in turn; DownloadError lists why
    each failed. Offline (`offline` or the environment, see `is_offline`): DownloadError without any request.
    """
    src: Source = all_sources()[key]
    folder = Path(models).expanduser() if models else locate.models_dir()
    dest = folder / src.name
    if dest.exists() and not force:
        return dest
    if key == "base" and not force:
        have = [folder / n for n in locate.SD_SINGLE_FILES if (folder / n).exists()]
        if have:
            return have[0]
        linked = link_cached_base(folder)
        if linked is not None:
            return linked
    if is_offline(offline):
        raise DownloadError(f"{src.name}: not downloaded (offline: --offline, OSEDIFF_OFFLINE or HF_HUB_OFFLINE)")
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for origin in src.origins:
        try:
            if isinstance(origin, str):  # "hf-snapshot:<repo>"
                return fetch_hf_base(origin.split(":", 1)[1], dest, timeout=timeout)
            log.info("downloading %s%s from %s into %s", src.what, f" ({human(src.size)})" if src.size else "",
                     describe(origin), dest)
            verify = _verifier(key)
            if isinstance(origin, HFFile):
                return fetch_hf_file(origin, dest, verify=verify, timeout=timeout)
            assert isinstance(origin, URLFile)
            return fetch_url(origin.url, dest, kind=origin.kind, blob_sha1=src.blob_sha1, verify=verify,
                             timeout=timeout, progress=progress)
        except DownloadError as e:
            errors.append(str(e))
            log.debug("%s", e)
    raise DownloadError("; ".join(errors))


def link_cached_base(folder: Path) -> Path | None:
    """SD 2.1-base from the Hugging Face cache, linked into the models folder (nothing copied or fetched):
    `stable-diffusion-2-1-base` -> the snapshot, or `<published name>` -> the single file. None if not cached."""
    from osediff.weights.hfcache import find_base

    hit = find_base()
    if hit is None:
        return None
    name = "stable-diffusion-2-1-base" if hit.form == "diffusers folder" else Path(hit.path).name
    link = folder / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(hit.path, target_is_directory=hit.form == "diffusers folder")
    except OSError as e:  # no symlinks here (Windows without developer mode): use the cache where it is
        log.warning("SD 2.1-base found in %s; could not link it into %s (%s): it is used from the cache",
                    hit.describe(), folder, e)
        return Path(hit.path)
    log.info("SD 2.1-base found in %s; linked %s to it (nothing downloaded)", hit.describe(), link)
    return link


def _verifier(key: str) -> Callable[[Path], None]:
    return lambda p: check.verify(key, p)
