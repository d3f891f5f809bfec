"""A self-contained HTML report of an evaluation: means, the best and worst images per metric as
LR | SR | (second method) | HR crops, per-image plots and the full per-image table, and a table of the metrics with
their backends, implementations and licences.

Everything is embedded (images as base64 PNG), so the file can be mailed or attached to an issue. Plots need
matplotlib (part of `osediff[eval]`); without it the report says so and shows the rest. matplotlib is used
through its object API (`Figure` + Agg canvas), so the caller's pyplot state and backend are left alone.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image

from osediff import __version__
from osediff.evaluation.evaluate import DATASET_LEVEL, LOWER_IS_BETTER, Evaluation, read_rgb
from osediff.evaluation.metrics import rgb_to_y

DISPLAY = 256  # px: crops are shown at this width, nearest-neighbour, so pixels stay visible

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:.25em .5em;text-align:right;font-variant-numeric:tabular-nums}
td.l,th.l{text-align:left}
.crops td{text-align:center;vertical-align:top}
.crops img{width:DISPLAYpx;image-rendering:pixelated}
.note{background:#fff4d6;padding:.5em 1em;border-left:4px solid #e0a800}
figure{display:inline-block;margin:.5em}
""".replace("DISPLAY", str(DISPLAY))


def worst_window(error: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left `(row, col)` of the `size`×`size` window with the largest mean of `error` `(H, W)`, searched on
    a grid of stride size/2 (the last window touches the bottom-right edge). Shows where methods differ."""
    h, w = error.shape
    size = min(size, h, w)
    rows = sorted({*range(0, h - size + 1, max(size // 2, 1)), h - size})
    cols = sorted({*range(0, w - size + 1, max(size // 2, 1)), w - size})
    # Window sums from the integral image: (H+1, W+1).
    s = np.pad(error, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    sums = [(s[r + size, c + size] - s[r, c + size] - s[r + size, c] + s[r, c], r, c) for r in rows for c in cols]
    _, r, c = max(sums, key=lambda t: t[0])  # the first (top-left) on ties
    return int(r), int(c)


def _png_b64(rgb: np.ndarray) -> str:
    """`(3, H, W)` float in [0, 1] -> data URI of a PNG."""
    img = Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _crop_lr(lr: np.ndarray, hr_shape: tuple[int, int], box: tuple[int, int, int]) -> np.ndarray:
    """The LR region under an HR box `(row, col, size)`, `(3, h, w)` (shown enlarged by the browser)."""
    r, c, size = box
    sy, sx = lr.shape[1] / hr_shape[0], lr.shape[2] / hr_shape[1]
    r0, c0 = int(math.floor(r * sy)), int(math.floor(c * sx))
    r1, c1 = max(int(math.ceil((r + size) * sy)), r0 + 1), max(int(math.ceil((c + size) * sx)), c0 + 1)
    return lr[:, r0:r1, c0:c1]


def _crops_row(ev: Evaluation, index: int, crop: int) -> str:
    """One `<tr>` of crops for image `index`: LR (if known) | SR of every method | HR, same region."""
    pairs = [r.pairs[index] for r in ev.methods]
    hr = read_rgb(pairs[0].hr)
    srs = [read_rgb(p.sr) for p in pairs]
    size = min(crop, hr.shape[1], hr.shape[2])
    r, c = worst_window(np.abs(rgb_to_y(srs[0]) - rgb_to_y(hr)), size)
    cells = []
    if ev.lr_dir is not None:
        lr_path = pairs[0].lr
        cells.append(f'<img src="{_png_b64(_crop_lr(read_rgb(lr_path), hr.shape[1:], (r, c, size)))}">'
                     if lr_path else "(no LR)")
    cells += [f'<img src="{_png_b64(sr[:, r:r + size, c:c + size])}">' for sr in srs]
    cells.append(f'<img src="{_png_b64(hr[:, r:r + size, c:c + size])}">')
    return "<tr>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>"


def _crop_header(ev: Evaluation) -> str:
    labels = (["LR (input)"] if ev.lr_dir is not None else []) + [f"SR: {r.label}" for r in ev.methods] + ["HR"]
    return "<tr>" + "".join(f"<th>{html.escape(x)}</th>" for x in labels) + "</tr>"


def _best_worst(ev: Evaluation, metric: str, k: int) -> tuple[list[int], list[int]]:
    """Indices of the k best and k worst images of the main method for `metric`, best first / worst first."""
    v = np.asarray(ev.methods[0].values[metric])
    order = np.argsort(v, kind="stable")  # ascending
    if metric not in LOWER_IS_BETTER:
        order = order[::-1]
    k = min(k, len(order))
    return list(order[:k]), list(order[::-1][:k])


def _plot(ev: Evaluation, metric: str) -> str:
    """Per-image values of `metric` for every method, with dashed means, as a PNG data URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 2.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(ev.methods[0].pairs))
    for i, r in enumerate(ev.methods):
        v = np.asarray(r.values[metric])
        ax.plot(x, v, marker="o", ms=3, lw=0.8, color=f"C{i}", label=f"{r.label} (mean {np.mean(v):.4f})")
        ax.axhline(float(np.mean(v)), color=f"C{i}", ls="--", lw=0.8)
    ax.set_xlabel("image index (sorted by name; see the table below)")
    ax.set_ylabel(metric.upper() + (" (lower is better)" if metric in LOWER_IS_BETTER else " (higher is better)"))
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _means_table(ev: Evaluation) -> str:
    metrics = ev.computed
    head = "".join(f"<th>{m.upper()}{'↓' if m in LOWER_IS_BETTER else '↑'}</th>" for m in metrics)
    rows = "".join(f"<tr><td class=l>{html.escape(r.label)}</td><td class=l>{html.escape(str(r.sr_dir))}</td>"
                   + "".join(f"<td>{r.means()[m]:.4f}</td>" for m in metrics) + "</tr>" for r in ev.methods)
    return f"<table><tr><th class=l>method</th><th class=l>folder</th>{head}</tr>{rows}</table>"


def _sources_table(ev: Evaluation) -> str:
    """One row per asked metric: backend, implementation, licence, whether its numbers are the paper's, and
    the library versions that computed it."""
    rows = []
    for m, s in ev.sources().items():
        comparable = {True: "yes", False: "no", None: "—"}[s["comparable_with_paper"]]
        status = html.escape(ev.versions.get(m) or ("not computed" if m in ev.unavailable else "—"))
        cells = [m.upper(), s["backend"], s["implementation"] or "—", s["licence"] or "—", comparable,
                 s["note"]]
        rows.append("<tr>" + "".join(f"<td class=l>{html.escape(str(c))}</td>" for c in cells)
                    + f"<td class=l>{status}</td></tr>")
    head = "".join(f"<th class=l>{h}</th>" for h in ("metric", "backend", "implementation", "licence",
                                                     "paper's numbers", "note", "computed by"))
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _per_image_table(ev: Evaluation) -> str:
    metrics = [m for m in ev.computed if m not in DATASET_LEVEL]
    head = "".join(f"<th>{html.escape(r.label)}<br>{m.upper()}</th>" for m in metrics for r in ev.methods)
    rows = []
    for i, name in enumerate(ev.methods[0].names):
        cells = "".join(f"<td>{r.values[m][i]:.4f}</td>" for m in metrics for r in ev.methods)
        rows.append(f"<tr><td>{i}</td><td class=l>{html.escape(name)}</td>{cells}</tr>")
    return f"<table><tr><th>#</th><th class=l>image</th>{head}</tr>{''.join(rows)}</table>"


def render_report(ev: Evaluation, *, top_k: int = 2, crop: int = 128) -> str:
    """The report as one HTML string. `top_k` best and worst images per metric, `crop`-pixel HR crops taken
    where the main method's Y error is largest."""
    per_image = [m for m in ev.computed if m not in DATASET_LEVEL]
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>osediff eval: "
             f"{html.escape(ev.methods[0].label)}</title><style>{_CSS}</style></head><body>",
             f"<h1>osediff eval: {' vs '.join(html.escape(r.label) for r in ev.methods)}</h1>",
             f"<p>{len(ev.methods[0].pairs)} images; HR {html.escape(str(ev.hr_dir))}"
             + (f"; LR {html.escape(str(ev.lr_dir))}" if ev.lr_dir else "")
             + f"; osediff {__version__}; {time.strftime('%Y-%m-%d %H:%M')}. "
             "Protocol: spec §5.1 (the authors' pyiqa 0.1.10 settings), files paired by name.</p>",
             "<h2>Means</h2>", _means_table(ev)]
    if ev.unavailable:
        parts.append('<div class=note><b>Not computed:</b><ul>' + "".join(
            f"<li>{m}: {html.escape(why)}</li>" for m, why in ev.unavailable.items()) + "</ul></div>")
    parts += [f"<h3>Metrics: implementations and licences (backend {html.escape(ev.backend)})</h3>",
              _sources_table(ev)]

    parts.append("<h2>Best and worst images</h2><p>Each row shows the same region of every image: the "
                 f"{crop}×{crop} HR window where the first method's luma error is largest.</p>")
    n_cols = (ev.lr_dir is not None) + len(ev.methods) + 1
    for m in per_image:
        best, worst = _best_worst(ev, m, top_k)
        for title, idx in (("best", best), ("worst", worst)):
            parts.append(f"<h3>{m.upper()}: {title}</h3><table class=crops>{_crop_header(ev)}")
            for i in idx:
                vals = ", ".join(f"{html.escape(r.label)} {r.values[m][i]:.4f}" for r in ev.methods)
                parts.append(f"<tr><td class=l colspan={n_cols}><b>{html.escape(ev.methods[0].names[i])}</b>: "
                             f"{m.upper()} {vals}</td></tr>{_crops_row(ev, i, crop)}")
            parts.append("</table>")

    parts.append("<h2>Per-image plots</h2>")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parts.append("<p class=note>matplotlib is not installed, so there are no plots: "
                     "pip install matplotlib (or osediff[eval]).</p>")
    else:
        parts += [f'<figure><img src="{_plot(ev, m)}" alt="{m} per image"></figure>' for m in per_image]

    parts += ["<h2>All images</h2>", _per_image_table(ev), "</body></html>"]
    return "\n".join(parts)


def write_report(ev: Evaluation, path: str | Path, *, top_k: int = 2, crop: int = 128) -> Path:
    """Write `render_report(ev)` to `path` (usually `<out>/report.html`) and return the path."""
    path = Path(path)
    path.write_text(render_report(ev, top_k=top_k, crop=crop), encoding="utf-8")
    return path
