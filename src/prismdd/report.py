"""report: one self-contained HTML page for a whole run (``prismdd run``), plus a terminal table.

Size: about 680 lines for one output: number formatting, the figures (matplotlib) and the HTML page. The figures
section (about 200 lines) could be a module of its own; it stays because the page is its only reader and both
share the method colours and captions.

``write_report(out_dir, results)`` writes ``out_dir/report.html`` (inline CSS, every figure embedded as a
base64 PNG data URI, no scripts, nothing fetched from the network) and the figures as PNG files in
``out_dir/figures/``. The page shows the numbers exactly as ``results`` gives them: nothing is computed
here except formatting and plots.

``results`` schema (produced by the pipeline)::

    {"dataset", "num_classes", "class_names", "ipc", "student", "protocol", "date", "command",
     "rows": [{"method", "top1", "top1_std", "runs" (seeds behind the mean), "top5", "intra_class_cos",
               "inter_class_cos", "images", "seconds", "distilled": folder | None,
               "curve": [{"epoch", "top1"}, ...]}, ...],
     "timings": {stage: seconds}, "reused": [stage, ...] (stages reused from an earlier run),
     "teachers": {arch: {"test_top1", "trust" ("ok" | "weak" | "at chance"), "wall_time_s"}}, "config": {...},
     "embedding": {"method", "points": [[x, y]], "labels": [set name], "classes": [int]} | None,
     "audit": {"targets": [{"target", "auc", "tpr_at_0.1pct_fpr", "tpr_at_1pct_fpr", ...}]} | None,
     "warnings": [str, ...]  (optional; shown in a box under the header, e.g. metrics.json's warnings),
     "observer": {"arch", "test_top1", "trust", "wall_time_s"}  (optional; named under the results table)}
"""
from __future__ import annotations

import base64
import html
import json
import re
import textwrap
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .core.io import atomic_path
from .core.presets import METHODS, preset_file
from .core.regimes import REGIME_WORDS, summary_line
from .core.scores import missing_line
from .core.text import format_table

MAX_GRID_CLASSES = 20  # rows of a per-method image grid
MAX_GRID_IPC = 10  # columns of a per-method image grid
DASH = "\u2013"  # shown for a missing number
CLASS_MARKERS = ["o", "s", "^", "v", "D", "P", "X", "*", "<", ">"]  # embedding: marker by class (cycled)

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222; background: #fff;
       max-width: 1100px; margin: 24px auto; padding: 0 20px; line-height: 1.45; font-size: 15px; }
h1 { font-size: 26px; margin-bottom: 4px; }
h2 { font-size: 20px; margin-top: 36px; border-bottom: 2px solid #e3e3e3; padding-bottom: 4px; }
h3 { font-size: 16px; margin: 20px 0 6px; }
table { border-collapse: collapse; margin: 8px 0 4px; font-size: 14px; }
th, td { border: 1px solid #d6d6d6; padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: #f3f5f7; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.meta td { overflow-wrap: anywhere; }
table.meta td:first-child { width: 90px; font-weight: 600; background: #f3f5f7; white-space: nowrap; }
tr:nth-child(even) td { background: #fafbfc; }
.note { color: #555; font-size: 13.5px; margin: 4px 0 12px; }
.warn { background: #fff7e0; border-left: 4px solid #e0a800; padding: 8px 12px; font-size: 14px; }
.verdict { background: #eef6ee; border-left: 4px solid #2e7d32; padding: 10px 14px; font-size: 15px; }
figure { margin: 14px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 13.5px; margin-top: 4px; }
.grids { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.grids figure { margin: 0; display: table; }
.grids figcaption { display: table-caption; caption-side: bottom; overflow-wrap: anywhere; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; padding: 12px; overflow-x: auto; font-size: 12.5px;
      line-height: 1.35; max-height: 600px; }
footer { margin-top: 40px; color: #888; font-size: 12px; }
"""


# ----------------------------------------------------------------------------- formatting
def _num(v, digits: int = 1) -> str | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{f:.{digits}f}" if np.isfinite(f) else str(f)


def runs_of(row: dict) -> int:
    """How many runs (seeds) a row's mean is over; a row without the count (a hand-made results file): 1 unless a
    non-zero std says otherwise."""
    if row.get("runs") is not None:
        return int(row["runs"])
    return 2 if row.get("top1_std") else 1


def fmt_top1(row: dict, dash: str = DASH) -> str:
    """``81.2 ± 0.3`` over several runs, ``81.2`` for one run (a std of one run is not a measurement)."""
    top1 = _num(row.get("top1"))
    if top1 is None:
        return dash
    std = _num(row.get("top1_std"))
    return f"{top1} \u00b1 {std}" if std is not None and runs_of(row) > 1 else top1


REFERENCE_ROWS = ("full",)  # a different kind of number (all the data, hard labels): not in the verdict


def row_label(row: dict) -> str:
    """The name a row is shown under: the pipeline names the ``full`` row for what it is (all the training data,
    hard labels, a capped step budget), so a short budget does not read as if full data were worse than 100 images."""
    return str(row.get("label") or row.get("method", "?"))


UNIT_WORDS = {"s": "seconds", "min": "minutes", "h": "hours"}


def time_unit(values: Iterable) -> tuple[str, float]:
    """One unit for a whole column of durations (seconds): s, min or h by the largest, and its divisor."""
    top = max((float(v) for v in values if v is not None), default=0.0)
    return ("h", 3600.0) if top >= 3600 else ("min", 60.0) if top >= 60 else ("s", 1.0)


def untrusted_teachers(teachers: dict | None) -> str | None:
    """Why no winner can be read, or None: the primary teacher (the first) or every teacher is at chance, so the
    soft labels and the recovery signal carry (next to) no information about the classes."""
    teachers = teachers or {}
    at_chance = [a for a, t in teachers.items() if (t or {}).get("trust") == "at chance"]
    if not at_chance or (next(iter(teachers)) not in at_chance and len(at_chance) < len(teachers)):
        return None
    shown = ", ".join(f"{a} {float(teachers[a]['test_top1']):.1f}%" for a in at_chance)
    return (f"No winner can be read from this run: the teachers are at chance level ({shown}), so the soft labels "
            f"and the recovery signal carry next to no information and the differences below are noise. Train the "
            f"teachers longer (--teacher-steps) or with a smaller batch, or check the data.")


def verdict(rows: list[dict], teachers: dict | None = None) -> str | None:
    """One paragraph: which set won, by how much, and whether that is more than the seed-to-seed spread; or,
    when the teachers are at chance, that no winner can be read."""
    if (why := untrusted_teachers(teachers)) is not None:
        return why
    cands = sorted((r for r in rows if r.get("top1") is not None and r.get("method") not in REFERENCE_ROWS),
                   key=lambda r: -float(r["top1"]))
    if not cands:
        return None
    best = cands[0]
    text = f"Best: {best['method']} with {float(best['top1']):.1f}% top-1"
    if len(cands) > 1:
        second = cands[1]
        margin = float(best["top1"]) - float(second["top1"])
        text += f", {margin:.1f} points ahead of {second['method']} ({float(second['top1']):.1f}%)."
        n = min(runs_of(best), runs_of(second))
        if n <= 1:
            text += " n = 1: no spread measured, so this margin cannot be told apart from seed-to-seed noise."
        else:
            spread = max(float(best.get("top1_std") or 0), float(second.get("top1_std") or 0))
            within = margin <= spread
            text += (f" Over {n} seeds the margin is {'within' if within else 'larger than'} the seed-to-seed "
                     f"spread (std up to {spread:.1f} points)" + ("; treat the two as tied." if within else "."))
        real = next((r for r in cands if r.get("method") == "random-real"), None)
        if real is not None and best is not real and real is not second:  # (as second, its margin is said above)
            text += (f" Against a random real subset with the same soft labels: "
                     f"{float(best['top1']) - float(real['top1']):+.1f} points.")
        elif real is best:
            text += " No distilled set beat the random real subset trained with the same soft labels."
    else:
        text += "."
    ref = next((r for r in rows if r.get("method") in REFERENCE_ROWS and r.get("top1") is not None), None)
    if ref is not None:
        text += f" Reference: the full training set reached {float(ref['top1']):.1f}% under its own budget."
    return text


def method_colors(names: Iterable[str]) -> dict[str, tuple]:
    """One colour per method, the same in every figure of a report (order of first appearance)."""
    cmap = _plt().cm.tab10
    return {n: cmap(i % 10) for i, n in enumerate(dict.fromkeys(str(n) for n in names))}


def fmt_seconds(v, dash: str = DASH) -> str:
    if v is None:
        return dash
    s = float(v)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _cell(v, digits: int = 1, dash: str = DASH) -> str:
    """A table cell: floats with ``digits`` decimals, integers as they are, None as a dash."""
    if v is None:
        return dash
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return _num(v, digits)
    return str(v)


def _audit_cell(v) -> str:
    """Audit numbers span orders of magnitude (TPR at 0.1 % FPR): four significant digits, not decimals."""
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return _cell(v)


def scores_section(rows: list[dict], about: dict) -> list[str]:
    """DD-Ranking's LRS and ARS per distilled set with the numbers behind them; a score that lacks an input shows
    none and says which (the pipeline computes them: ``score_row``)."""
    scored = [r for r in rows if r.get("scores")]
    if not scored:
        return []
    if not about.get("computed"):  # a table of "needs ..." cells would say nothing more than this line
        return ["<h2>DD-Ranking scores</h2>",
                '<p class="note">Not computed (LRS and ARS need extra students per set): run it again with '
                "<code>--scores</code> (finished stages are reused).</p>"]
    body = []
    for r in scored:
        cells = [(row_label(r), False)]
        for key, parts_ in (("lrs", ("hlr", "ior")), ("ars", ("gap_aug", "gap_noaug"))):
            e = r["scores"][key]
            if e.get("score") is None:
                cells += [(missing_line(e), False), (DASH, True), (DASH, True)]
            else:
                cells += [(f"{100 * e['score']:.2f}", True)] + [(f"{e[p]:+.2f}", True) for p in parts_]
        body.append(cells)
    out = ["<h2>DD-Ranking scores</h2>",
           _table(["method", "LRS (x100)", "HLR (points)", "IOR (points)", "ARS (x100)", "gap with aug", "gap without aug"],
                  body)]
    out.append(f'<p class="note">{_e(about.get("what", ""))} 26.89 = a set no better than random real with no '
               "hard-label gap; higher is better.</p>")
    return out


def shows_regimes(regimes: list[str] | None) -> bool:
    """One top-1 column per regime unless the run trained only the default (kd), whose table stays as it was."""
    return bool(regimes) and list(regimes) != ["kd"]


def regimes_section(rows: list[dict], about: dict) -> list[str]:
    """Every set under every label regime the run trained, random real beside it, the paired margin of the best set
    over random real, and each regime's full-data ceiling; one sentence per regime says who won and by how much."""
    regimes = about.get("list") or []
    if not shows_regimes(regimes):
        return []
    summary = about.get("summary") or {}
    body = []
    for r in rows:
        cells = [(row_label(r), False)]
        for g in regimes:
            e = (r.get("regimes") or {}).get(g)
            cells.append((fmt_top1(e) if e else DASH, True))
        body.append(cells)
    out = ["<h2>Label regimes</h2>",
           _table(["set"] + [f"top-1 {g}" for g in regimes], body, cls="regimes"),
           "<ul>" + "".join(f"<li>{_e(summary_line(summary[g]))}</li>" for g in regimes if g in summary) + "</ul>"]
    protocols = about.get("protocols") or {}
    out.append('<p class="note">' + " ".join(f"<b>{_e(g)}</b>: {_e(protocols.get(g, REGIME_WORDS[g]))}."
                                             for g in regimes) +
               " Margins over random real pair seed s with seed s (same student seed).</p>")
    return out


def print_table(rows: list[dict], regimes: list[str] | None = None) -> str:
    """The terminal summary ``method | top-1 | intra-class cos | images | time`` as a string, with one top-1 column
    per label regime (``top-1 hard``, ...) when the run trained other regimes than kd.

    Returns the text without printing it (callers log it: ``logger.info(print_table(rows))``).
    """
    tops = [f"top-1 {g}" for g in regimes] if shows_regimes(regimes) else ["top-1"]
    cols = ["method", *tops, "intra-class cos", "images", "time"]
    table = [{"method": row_label(r), "top-1": fmt_top1(r, "-"),  # the names the report shows
              **{f"top-1 {g}": fmt_top1((r.get("regimes") or {}).get(g) or {}, "-") for g in regimes or []},
              "intra-class cos": _cell(r.get("intra_class_cos"), 4, "-"),
              "images": _cell(r.get("images"), 0, "-"), "time": fmt_seconds(r.get("seconds"), "-")} for r in rows]
    scored = [(t, r) for t, r in zip(table, rows) if r.get("scores")]
    if any(r["scores"][k].get("score") is not None for _, r in scored for k in ("lrs", "ars")):
        cols += ["LRS x100", "ARS x100"]  # DD-Ranking's scores, only when the run measured them
        for t, r in zip(table, rows):
            for k in ("lrs", "ars"):
                v = ((r.get("scores") or {}).get(k) or {}).get("score")
                t[f"{k.upper()} x100"] = "-" if v is None else f"{100 * v:.2f}"
    return format_table(table, cols)


# ----------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display (CI, servers)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _plt()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "set"


def _class_names(folder: Path) -> list[str] | None:
    try:
        m = json.loads((folder / "manifest.json").read_text())
        return list(m["inputs"]["dataset"]["class_names"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_png(path: Path) -> np.ndarray:
    """A PNG as uint8 (H, W, 3), grey images replicated to RGB so colour and grey sets tile alike."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def grid_figure(method: str, folder, path: Path) -> tuple[Path | None, str]:
    """Per-class image grid of a distilled folder (classes as rows, IPC as columns) -> (png, caption).

    The images are tiled into one mosaic (1-pixel white gutters) shown in a single axes, so every cell
    keeps its aspect ratio whatever the image size.
    """
    folder = Path(folder)
    class_dirs = sorted((d for d in (folder / "images").glob("*") if d.is_dir() and d.name.isdigit()),
                        key=lambda d: int(d.name))
    files = [sorted(d.glob("*.png")) for d in class_dirs]
    if not class_dirs or not any(files):
        return None, f"{method}: no images found under {folder / 'images'}"
    n_classes, ipc = len(class_dirs), max(len(f) for f in files)
    rows, cols = min(n_classes, MAX_GRID_CLASSES), max(1, min(ipc, MAX_GRID_IPC))
    first = _read_png(next(f for fs in files for f in fs))
    h, w = first.shape[:2]
    gap = 1
    mosaic = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for r in range(rows):
        for k, f in enumerate(files[r][:cols]):
            img = _read_png(f)
            if img.shape[:2] != (h, w):  # mixed sizes: nearest-neighbour fit into the cell
                from PIL import Image

                img = np.asarray(Image.fromarray(img).resize((w, h), Image.NEAREST))
            y, x = r * (h + gap), k * (w + gap)
            mosaic[y: y + h, x: x + w] = img
    names = _class_names(folder)
    labels = [names[int(d.name)] if names and int(d.name) < len(names) else d.name for d in class_dirs[:rows]]
    plt = _plt()
    cell = 0.55 if h <= 32 else 0.9  # inches per image: tiny images need few pixels, 224 px crops more
    fig, ax = plt.subplots(figsize=(cols * cell + 1.4, rows * cell + 0.7))
    ax.imshow(mosaic, interpolation="antialiased")  # nearest when enlarging (8 px digits), smooth when shrinking
    ax.set_yticks([r * (h + gap) + h / 2 - 0.5 for r in range(rows)])
    ax.set_yticklabels([lab[:16] for lab in labels], fontsize=8)
    ax.set_xticks([k * (w + gap) + w / 2 - 0.5 for k in range(cols)])
    ax.set_xticklabels([str(k) for k in range(cols)], fontsize=8)
    ax.set_xlabel("IPC index", fontsize=8)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    ax.set_title(method, fontsize=11)
    shown = f"{rows} of {n_classes} classes" if rows < n_classes else f"{n_classes} classes"
    shown += f", {cols} of {ipc} images per class" if cols < ipc else f", {ipc} image(s) per class"
    return _save(fig, path), f"{method}: {shown}"


def accuracy_figure(rows: list[dict], path: Path, colors: dict | None = None) -> Path | None:
    rows = [r for r in rows if r.get("top1") is not None]
    if not rows:
        return None
    plt = _plt()
    names = [str(r.get("method")) for r in rows]
    colors = colors or method_colors(names)
    # long row names (the full row's) wrapped so they do not run into their neighbours' names
    labels = ["\n".join(textwrap.wrap(row_label(r), 14)) for r in rows]
    top1 = [float(r["top1"]) for r in rows]
    # error bars only where several runs give a spread; a single run's "0.0" would read as no noise at all
    std = [float(r.get("top1_std") or 0.0) if runs_of(r) > 1 else 0.0 for r in rows]
    several = any(runs_of(r) > 1 for r in rows)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 2), 3.8))
    bars = ax.bar(range(len(rows)), top1, yerr=std if several else None, capsize=4,
                  color=[colors[n] for n in names], edgecolor="black", linewidth=0.5)
    for b, v, s in zip(bars, top1, std):
        ax.text(b.get_x() + b.get_width() / 2, v + s, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=20 if len(rows) > 5 else 0, ha="right" if len(rows) > 5 else "center",
                       fontsize=8)
    # the axis spans the numbers, not 0-100: sub-point gaps between methods must be visible (the labels on the
    # bars and the note under the chart say so)
    lo, hi = min(t - s for t, s in zip(top1, std)), max(t + s for t, s in zip(top1, std))
    pad = max(1.0, 0.15 * (hi - lo))
    ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + 2 * pad))
    ax.set_ylabel("student top-1 on real test set (%)" + ("" if lo - pad <= 0 else "\n(axis does not start at 0)"))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title("Top-1 accuracy (mean \u00b1 std over runs)" if several else "Top-1 accuracy (one run each)")
    return _save(fig, path)


def _curve_points(row: dict) -> list[tuple]:
    return [(p["epoch"], p["top1"]) for p in row.get("curve") or [] if p.get("top1") is not None]


def curves_figure(rows: list[dict], path: Path, colors: dict | None = None) -> Path | None:
    """Test accuracy during training, for the rows evaluated at two or more epochs (one point is no curve)."""
    colors = colors or method_colors(str(r.get("method")) for r in rows)
    rows = [r for r in rows if len(_curve_points(r)) >= 2]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    for r in rows:
        pts = _curve_points(r)
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(pts) <= 20 else None, markersize=3, label=str(r.get("method")),
                color=colors[str(r.get("method"))])
    ax.set_xlabel("student epoch")
    ax.set_ylabel("top-1 on real test set (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Student training curves")
    return _save(fig, path)


def embedding_figure(emb: dict, path: Path, colors: dict | None = None,
                     class_names: list[str] | None = None) -> Path | None:
    """One panel per method: real points (grey) vs that method's points (colour); marker = class, named in a
    legend under the panels."""
    pts = np.asarray(emb.get("points") or [], dtype=float).reshape(-1, 2)
    labels = list(emb.get("labels") or [])
    classes = list(emb.get("classes") or [0] * len(labels))
    if not len(pts) or len(labels) != len(pts):
        return None
    plt = _plt()
    sets = list(dict.fromkeys(labels))
    methods = [s for s in sets if s != "real"] or sets
    colors = colors or method_colors(methods)
    has_real = "real" in sets and methods != sets[:1]
    lab, cls = np.array(labels), np.array(classes)
    n = len(methods)
    ncols = min(n, 3)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 4.0 * nrows + 0.4), squeeze=False,
                             sharex=True, sharey=True)
    uniq_classes = sorted(set(cls.tolist()))
    for i, m in enumerate(methods):
        ax = axes[i // ncols][i % ncols]
        color = colors.get(m) or plt.cm.tab10(i % 10)
        for j, c in enumerate(uniq_classes):
            mk = CLASS_MARKERS[j % len(CLASS_MARKERS)]
            if has_real:
                sel = (lab == "real") & (cls == c)
                ax.scatter(pts[sel, 0], pts[sel, 1], s=14, marker=mk, color="0.6", alpha=0.45, linewidths=0,
                           label="real" if j == 0 else None)
            sel = (lab == m) & (cls == c)
            ax.scatter(pts[sel, 0], pts[sel, 1], s=28, marker=mk, color=color, alpha=0.9, edgecolors="black",
                       linewidths=0.3, label=m if j == 0 else None)
        ax.set_title(f"real vs {m}" if has_real else m, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=8, loc="best", markerscale=1.0)
    for i in range(n, nrows * ncols):
        axes[i // ncols][i % ncols].axis("off")
    from matplotlib.lines import Line2D

    shown = uniq_classes[:len(CLASS_MARKERS)]  # the markers cycle after that: say so instead of repeating them
    handles = [Line2D([], [], marker=CLASS_MARKERS[j], linestyle="", color="black", markersize=6,
                      label=(class_names[c] if class_names and c < len(class_names) else f"class {c}"))
               for j, c in enumerate(shown)]
    more = len(uniq_classes) - len(shown)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False,
               title="marker = class" + (f" (repeating for the other {more} classes)" if more > 0 else ""),
               title_fontsize=8)
    method = str(emb.get("method", "?")).upper().replace("TSNE", "t-SNE")
    fig.suptitle(f"{method} of observer features: real vs distilled (cf. paper Fig. 1, SRe2L vs PRISM)",
                 fontsize=11)
    legend_rows = -(-len(handles) // 5)
    fig.tight_layout(rect=(0, 0.05 + 0.05 * legend_rows, 1, 1))
    return _save(fig, path)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


# ----------------------------------------------------------------------------- HTML
def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _table(header: Iterable[str] | None, body: Iterable[Iterable[tuple[str, bool]]], cls: str = "") -> str:
    """``body``: rows of (cell text, numeric?) pairs; text is escaped here. ``header`` None: no header row."""
    head = "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    rows = "".join("<tr>" + "".join(f'<td class="num">{_e(t)}</td>' if num else f"<td>{_e(t)}</td>"
                                    for t, num in row) + "</tr>" for row in body)
    cls_attr = f' class="{cls}"' if cls else ""
    return f"<table{cls_attr}>{head}<tbody>{rows}</tbody></table>"


def _figure(path: Path | None, caption: str, alt: str) -> str:
    if path is None:
        return f'<p class="note">{_e(caption)}</p>'
    return (f'<figure><img src="{_data_uri(path)}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


COLUMN_NAMES = {"test_top1": "test top-1 (%)", "test_top5": "test top-5 (%)", "wall_time_s": "training time",
                "epochs": "epochs", "role": "role", "folder": "folder", "trust": "trust"}


def _dict_table(items: dict, key_header: str, preferred: list[str]) -> str:
    """A table of ``{name: {col: value}}`` with ``preferred`` columns first, then any others present;
    headers are readable names, not the JSON keys."""
    cols = [c for c in preferred if any(c in (v or {}) for v in items.values())]
    cols += sorted({k for v in items.values() for k in (v or {}) if k not in cols})
    body = []
    for name, v in items.items():
        v = v or {}
        body.append([(name, False)] + [(fmt_seconds(v.get(c)) if c.endswith("_s") and v.get(c) is not None
                                        else _cell(v.get(c), 2) if not isinstance(v.get(c), (dict, list))
                                        else json.dumps(v.get(c)), isinstance(v.get(c), (int, float)))
                                       for c in cols])
    return _table([key_header] + [COLUMN_NAMES.get(c, c.replace("_", " ")) for c in cols], body)


def write_report(out_dir, results: dict) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/figures/*.png``; returns the HTML path."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    rows = list(results.get("rows") or [])
    title = f"prismdd report: {results.get('dataset', '?')}, IPC {results.get('ipc', '?')}"
    parts = [f"<h1>{_e(title)}</h1>"]

    # --- header
    meta = [(k, results.get(k)) for k in ("dataset", "ipc", "student", "protocol", "date", "command")]
    parts.append(_table(None, [[(k.upper() if k == "ipc" else k, False), (_cell(v), False)] for k, v in meta],
                        cls="meta"))

    summary = verdict(rows, results.get("teachers"))
    main = next((r.get("regime") for r in rows if r.get("regime")), None)
    if summary and main and untrusted_teachers(results.get("teachers")) is None:  # the verdict says which regime
        summary = f"Regime {main}, {REGIME_WORDS[main]}. {summary}"
    if summary:
        parts.append(f'<p class="verdict">{_e(summary)}</p>')
    for w in results.get("warnings") or []:
        parts.append(f'<p class="warn">{_e(w)}</p>')
    colors = method_colors(str(r.get("method")) for r in rows)
    several = any(runs_of(r) > 1 for r in rows)

    # --- accuracy table
    parts.append("<h2>Results</h2>")
    # top-5 of 5 classes or fewer is 100 % by construction: shown only where it says something
    top5 = (results.get("num_classes") or 6) > 5
    unit, div = time_unit(r.get("seconds") for r in rows)
    body = [[(row_label(r), False), (fmt_top1(r), True)] + ([(_cell(r.get("top5")), True)] if top5 else []) +
            [(_cell(r.get("intra_class_cos"), 4), True), (_cell(r.get("inter_class_cos"), 4), True),
             (_cell(r.get("images"), 0), True),
             (_cell(None if r.get("seconds") is None else float(r["seconds"]) / div, 1), True)] for r in rows]
    parts.append(_table(["method", "top-1 (mean \u00b1 std)" if several else "top-1 (one run)"] +
                        (["top-5"] if top5 else []) +
                        ["intra-class cos", "inter-class cos", "images", f"time ({unit})"], body))
    obs = results.get("observer") or {}
    obs_text = ""
    if obs.get("arch"):
        obs_text = f" Observer: {_e(obs['arch'])}" + (f" (test top-1 {_e(_cell(obs.get('test_top1')))}%)"
                                                      if obs.get("test_top1") is not None else "") + "."
    parts.append(f'<p class="note">Top-1{"/top-5" if top5 else ""}: student accuracy (%) on the real test split, '
                 "as reported by the pipeline (see the protocol above). Intra-/inter-class cos: mean cosine similarity "
                 "of an observer network's penultimate features; <b>lower intra-class cosine = more diverse</b> images "
                 f"within a class.{obs_text} {DASH} = not measured. Time: wall clock of that method's stages, in "
                 f"{UNIT_WORDS[unit]}.</p>")

    parts.extend(regimes_section(rows, results.get("regimes") or {}))
    parts.extend(scores_section(rows, results.get("scores") or {}))

    # --- figures
    parts.append("<h2>Figures</h2>")
    acc_caption = ("Student top-1 per method; error bars: standard deviation over runs." if several else
                   "Student top-1 per method (one run each: no spread measured, so no error bars).")
    parts.append(_figure(accuracy_figure(rows, fig_dir / "accuracy.png", colors),
                         acc_caption if any(r.get("top1") is not None for r in rows)
                         else "No accuracy numbers to plot.", "accuracy bar chart"))
    single = [str(r.get("method")) for r in rows if len(_curve_points(r)) == 1]
    curves_caption = ("Top-1 on the real test set during student training."
                      + (f" Evaluated only at the end (no curve): {', '.join(single)}." if single else ""))
    parts.append(_figure(curves_figure(rows, fig_dir / "curves.png", colors),
                         curves_caption if any(len(_curve_points(r)) >= 2 for r in rows)
                         else "No training curves were recorded.", "training curves"))
    emb = results.get("embedding")
    emb_path = embedding_figure(emb, fig_dir / "embedding.png", colors, results.get("class_names")) if emb else None
    parts.append(_figure(emb_path, (f"2-D {emb.get('method', '?')} embedding of observer features, computed jointly "
                                    f"for all sets; grey: real images, colour: distilled images; marker shape: class. "
                                    f"A wider spread within a class means more diverse images."
                                    if emb_path else "No feature embedding was computed."), "feature embedding"))
    grids = []
    for r in rows:
        folder = r.get("distilled")
        if not folder:
            continue
        p, caption = grid_figure(str(r.get("method")), folder, fig_dir / f"grid_{_slug(r.get('method'))}.png")
        grids.append(_figure(p, caption, f"image grid {r.get('method')}"))
    if grids:
        parts.append("<h3>Distilled images</h3>")
        methods = [str(r.get("method")) for r in rows if r.get("distilled")]
        selected = [m for m in methods if m in METHODS and preset_file("recover", m).get("images") == "selected"]
        chosen = (f" {', '.join(selected)}: real training images chosen by a selection method, bit for bit"
                  + ("; the others are synthetic." if len(selected) < len(methods) else ".") if selected else "")
        parts.append('<p class="note">One grid per method, read from its distilled folder: rows are classes, '
                     f"columns are IPC indices (at most {MAX_GRID_CLASSES} classes and {MAX_GRID_IPC} images per "
                     f"class shown).{html.escape(chosen)}</p>")
        parts.append('<div class="grids">' + "".join(grids) + "</div>")

    # --- teachers, timings
    teachers = dict(results.get("teachers") or {})
    if obs.get("arch"):  # the observer is not a teacher, but a reader wants its accuracy beside theirs
        teachers[f"{obs['arch']} (observer, not a teacher)"] = {k: obs.get(k) for k in ("test_top1", "trust",
                                                                                         "wall_time_s")}
    if teachers:
        parts.append("<h2>Teachers and observer</h2>")
        parts.append(_dict_table(teachers, "architecture", ["test_top1", "trust", "test_top5", "role", "epochs",
                                                            "wall_time_s", "folder"]))
        parts.append('<p class="note">Accuracy (%) on the real test split. Trust: <b>at chance</b> below chance + 10 % '
                     "of the way to 100 %, <b>weak</b> below halfway; a weak teacher's labels and statistics were used "
                     "all the same (the run said so when it trained them). The observer only measures diversity "
                     "(metrics); it took no part in synthesis or labelling.</p>")
    timings = dict(results.get("timings") or {})
    if timings:
        parts.append("<h2>Timings</h2>")
        whole = timings.pop("total", None)  # the run's own wall clock, not a sum of stages
        reused = set(results.get("reused") or [])
        body = [[(k + (" (reused: time of the run that made it)" if k in reused else ""), False),
                 (fmt_seconds(v), True)] for k, v in timings.items()]
        stage_sum = sum(float(v) for v in timings.values() if isinstance(v, (int, float)))
        body.append([("sum of the stages above", False), (fmt_seconds(stage_sum), True)])
        if whole is not None:
            body.append([("this run (wall clock; a reused stage costs ~0 here)", False), (fmt_seconds(whole), True)])
        parts.append(_table(["stage", "wall time"], body))

    # --- audit
    audit = results.get("audit")
    if audit:
        parts.append("<h2>Privacy audit (membership inference)</h2>")
        targets = audit.get("targets") or []
        preferred = ["target", "auc", "tpr_at_0.1pct_fpr", "tpr_at_1pct_fpr"]
        cols = [c for c in preferred if any(c in t for t in targets)]
        cols += sorted({k for t in targets for k in t if k not in cols})
        parts.append(_table(cols, [[(_audit_cell(t.get(c)), isinstance(t.get(c), (int, float)))
                                    for c in cols] for t in targets]))
        parts.append('<p class="warn">These are empirical membership-inference attack results on this run '
                     "(AUC 0.5 and TPR equal to the FPR are chance level). They are not a differential-privacy "
                     "guarantee: no gradient clipping or calibrated noise is involved, and a stronger attack may "
                     "do better (METHOD.md section 6).</p>")

    # --- config
    parts.append("<h2>Resolved configuration</h2>")
    parts.append(f"<pre>{_e(json.dumps(results.get('config') or {}, indent=2, default=str))}</pre>")
    parts.append(f"<footer>Written by prismdd. Every figure is embedded in this page; PNG copies are in "
                 f"{_e(fig_dir.name)}/.</footer>")

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    path = out_dir / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    for p in [path, *fig_dir.glob("*.png")]:
        _readable(p)
    return path


def _readable(path: Path) -> None:
    """atomic_path's temporary files are private (0600); a report is meant to be shared or served."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o644 & ~umask)
