"""The one call loaders use: find a weight, download it on first use, and check it before anyone loads it.

    path = obtain("weights", given)     # flag/env value, else the models folder, else a download (online)

For SD 2.1-base the Hugging Face cache is looked at (offline) before any download (`weights.hfcache`).

An explicit location (flag or environment variable) is never replaced by a download: if it is missing, the
message says so. A weight found or fetched is structurally checked (`weights.check`), so a wrong file gives a
one-line reason instead of a traceback deep inside the model code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from osediff.weights import check, locate
from osediff.weights.download import DownloadError, download, is_offline

log = logging.getLogger(__name__)


def obtain(key: str, given: str | os.PathLike | None = None, *, offline: bool | None = None,
           required: bool = True, base: str | None = None) -> str | None:
    """Location of weight `key`, fetched into the models folder if absent and online, then checked.

    Raises MissingWeightsError (what to download, where to put it, and the network error if a download was
    tried) when `required`, else returns None; BrokenWeightsError when the file is there but wrong. `base` (a
    local SD folder or single file) lets the OSEDiff weights be checked against the base model they will be merged into.
    """
    found = locate.find(key, given, required=False)
    if found is None and key == "base":  # before any download: SD 2.1-base already in the Hugging Face cache
        from osediff.weights.hfcache import find_base

        hit = find_base()
        if hit is not None:
            log.info("SD 2.1-base found in %s", hit.describe())
            found = hit.path
    if found is None:
        if is_offline(offline):
            if required:
                raise locate.MissingWeightsError(locate.missing_message(key) + "\n  (offline: not downloaded)")
            return None
        try:
            found = str(download(key))
        except DownloadError as e:
            if required:
                raise locate.MissingWeightsError(f"{locate.missing_message(key)}\n  download failed: {e}") from None
            log.warning("%s\n  download failed: %s", locate.missing_message(key), e)
            return None
    if Path(found).exists():
        local_base = base if base is not None and Path(base).exists() else None
        try:
            check.verify(key, found, local_base)
        except check.BrokenWeightsError as e:
            raise check.BrokenWeightsError(f"{locate.SPECS[key].what} at {found} is broken: {e}") from None
    return found
