"""Reading a .safetensors file one tensor at a time with plain reads, never mapping the whole file.

Why not `safetensors.safe_open`: it memory-maps the file, and every page it touches counts in the process's
resident set until the file is closed, so reading the 3.5 GB fp32 SD 2.1 UNet to build a 1.7 GB bf16 model
peaks at 3.5 GB (plus the model) even when each tensor is cast and dropped at once. Plain reads go through
the page cache, which is not part of the process. The format is small: an 8-byte little-endian header length,
a JSON header `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def header(path: str | os.PathLike) -> tuple[dict[str, dict], int]:
    """(tensor entries by name, offset of the data section) of a .safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(n))
    entries.pop("__metadata__", None)
    return entries, 8 + n


def iter_tensors(path: str | os.PathLike, names=None, *, reuse: bool = False,
                 file_order: bool = True) -> Iterator[tuple[str, object]]:
    """Yield (name, CPU tensor) in file order (`names`: only those; `file_order=False`: in the order of
    `names`), each read into its own fresh tensor.

    `reuse=True`: every tensor is a view of one scratch buffer (the size of the largest), valid only until
    the next one is read: for callers that cast or copy each tensor at once. It keeps the allocator from
    leaving a hole per read tensor between the kept ones (measured: ~0.6 GB of the full SD 2.1 build).
    Raises ValueError for dtypes outside _DTYPES (e.g. fp8), so callers can fall back to the library loader.
    """
    import torch

    entries, start = header(path)
    wanted = None if names is None else set(names)
    if file_order or names is None:
        order = sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0])
        order = [(n, e) for n, e in order if wanted is None or n in wanted]
    else:
        order = [(n, entries[n]) for n in dict.fromkeys(names)]
    for name, e in order:
        if e["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {e['dtype']}, which this reader does not handle")
    scratch = None
    if reuse and order:
        scratch = torch.empty(max(e["data_offsets"][1] - e["data_offsets"][0] for _, e in order), dtype=torch.uint8)
    with open(path, "rb", buffering=0) as f:
        for name, e in order:
            begin, end = e["data_offsets"]
            dtype = getattr(torch, _DTYPES[e["dtype"]])
            if scratch is None or end == begin:
                t = torch.empty(e["shape"], dtype=dtype)
            else:
                t = scratch[:end - begin].view(dtype).reshape(e["shape"])
            buf = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else None
            if buf is not None:
                if buf.nbytes != end - begin:
                    raise ValueError(f"{path}: tensor {name} has {end - begin} bytes for shape {e['shape']}")
                f.seek(start + begin)
                view, got = memoryview(buf), 0
                while got < buf.nbytes:  # readinto may return short counts on large reads
                    n = f.readinto(view[got:])
                    if not n:
                        raise ValueError(f"{path}: file ends inside tensor {name}")
                    got += n
            yield name, t
