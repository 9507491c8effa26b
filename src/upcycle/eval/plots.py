"""Figures: loss against training compute for several runs, and expert-load heatmaps.

matplotlib with the Agg backend (files only, no display). Every function writes one PNG and returns its
path; figures are closed afterwards, so long experiments can call them repeatedly.

Training metrics come from the `metrics.csv` a training run writes (columns at least some of `step`,
`tokens`, `flops`, `loss`, `val_loss`); `read_metrics` reads it tolerantly: unknown columns are kept,
empty cells are missing values.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Mapping, Sequence

from upcycle.errors import UpcycleError

DPI = 150
X_COLUMNS = ("flops", "tokens", "step")
X_LABELS = {"flops": "training FLOPs", "tokens": "training tokens", "step": "step"}
# Colour-blind safe, distinct in greyscale too (Okabe & Ito).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")

Curve = Sequence[tuple[float, float]]


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 11,
            "axes.titlesize": 13,
            "axes.labelsize": 12,
            "legend.fontsize": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    return plt


def save_figure(fig, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight", facecolor="white")
    tmp.replace(out_png)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out_png


# ------------------------------------------------------------------------------------------------ metrics


def mark_x(ax, x: float, label: str, *, ls="--", lw=1.2, line="0.3", text="0.3", at: float = 0.97) -> None:
    """A vertical line at data x with its label written along it, near the top (at > 0.5) or the bottom."""
    ax.axvline(x, color=line, ls=ls, lw=lw)
    ax.annotate(
        label,
        (x, at),
        xycoords=("data", "axes fraction"),
        rotation=90,
        ha="right",
        va="top" if at > 0.5 else "bottom",
        fontsize=9,
        color=text,
        xytext=(-3, 0),
        textcoords="offset points",
    )


def mark_y(ax, y: float, label: str, *, ls=":", lw=1.2, at: float = 0.005, boxed=True, zorder=None) -> None:
    """A horizontal line at data y with its label just above it at the left (on a white box if boxed)."""
    ax.axhline(y, color="0.35", ls=ls, lw=lw, zorder=zorder)
    box = dict(bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.8)) if boxed else {}
    ax.annotate(
        label,
        (at, y),
        xycoords=("axes fraction", "data"),
        xytext=(2, 3),
        textcoords="offset points",
        fontsize=9,
        color="0.3",
        **box,
    )


def read_metrics(path: str | Path) -> dict[str, list[float | None]]:
    """Columns of a training run's metrics.csv (a file, or a directory holding one) as floats; empty or
    non-numeric cells are None."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.csv"
    if not path.is_file():
        raise UpcycleError(f"metrics file not found: {path} (pass a training run's metrics.csv or its directory)")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise UpcycleError(f"{path}: empty file, no header row")
        cols: dict[str, list[float | None]] = {name.strip(): [] for name in reader.fieldnames}
        for row in reader:
            for name in reader.fieldnames:
                cols[name.strip()].append(_float(row.get(name)))
    return cols


def _float(cell) -> float | None:
    if cell is None:
        return None
    try:
        v = float(cell)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def metrics_curves(
    cols: Mapping[str, list[float | None]], x: str | None = None, source: str = "metrics.csv"
) -> tuple[str, list[tuple[float, float]], list[tuple[float, float]]]:
    """(x column used, training-loss curve, validation-loss curve) from read_metrics' columns. x defaults to
    the first of flops, tokens, step the file has values for; rows missing x or the loss are skipped."""
    candidates = [x] if x else [c for c in X_COLUMNS if any(v is not None for v in cols.get(c, []))]
    if not candidates or candidates[0] not in cols:
        want = x or " or ".join(X_COLUMNS)
        raise UpcycleError(f"{source}: no {want} column with values (columns: {', '.join(cols) or 'none'})")
    xc = candidates[0]

    def curve(y: str) -> list[tuple[float, float]]:
        return [(a, b) for a, b in zip(cols[xc], cols.get(y, [])) if a is not None and b is not None]

    train, val = curve("loss"), curve("val_loss")
    if not train and not val:
        raise UpcycleError(f"{source}: no loss or val_loss values to plot")
    return xc, train, val


# ------------------------------------------------------------------------------------------- loss vs FLOPs


def _si(v: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def plot_loss_vs_flops(
    runs: Mapping[str, Curve],
    out_png: str | Path,
    *,
    train: Mapping[str, Curve] | None = None,
    title: str = "Loss vs training compute",
    xlabel: str = "training FLOPs",
    ylabel: str = "validation loss",
    budget: float | None = None,
    budget_label: str = "dense pretraining",
    logx: bool = True,
    reference: Mapping[str, float] | None = None,
    ylim: tuple[float, float] | str | None = "auto",
) -> Path:
    """Several runs on one figure: one curve per label, x = compute (log scale), y = loss.

    runs: {label: [(x, loss), ...]} drawn as lines with markers; train: optional {label: [(x, loss)]} drawn
    thin and light in the same colour (the noisy training loss behind the validation points). The legend
    gives each run's last value.
    budget: a compute budget (e.g. the dense model's pretraining FLOPs); adds a top axis with x as a share of
    it and, when it falls inside the plotted range, a dashed vertical line. reference: horizontal dotted
    lines, e.g. {"dense start": 2.31}. ylim: (low, high), None for matplotlib's choice, or "auto": when one
    run starts far above where the runs end (a model trained from scratch next to warm-started ones), the
    y axis is cut so that the differences between the final losses stay readable."""
    plt = pyplot()
    train = train or {}
    labels = list(dict.fromkeys(list(runs) + list(train)))
    if not labels or not any(list(runs.get(k, [])) + list(train.get(k, [])) for k in labels):
        raise UpcycleError("nothing to plot: every run is empty")
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    xs_all: list[float] = []
    ys_all: list[float] = []
    lasts: list[float | None] = []
    for i, label in enumerate(labels):
        colour = PALETTE[i % len(PALETTE)]
        t = sorted((x, y) for x, y in train.get(label, []) if not logx or x > 0)
        v = sorted((x, y) for x, y in runs.get(label, []) if not logx or x > 0)
        if t:
            ax.plot(
                [p[0] for p in t],
                [p[1] for p in t],
                color=colour,
                alpha=0.3,
                lw=1.0,
                label=None if v else f"{label}  ({t[-1][1]:.3f})",
            )
        if v:
            many = len(v) > 40
            ax.plot(
                [p[0] for p in v],
                [p[1] for p in v],
                color=colour,
                lw=2.0,
                marker=None if many else "o",
                ms=4.5,
                label=f"{label}  ({v[-1][1]:.3f})",
            )
        xs_all += [p[0] for p in t + v]
        ys_all += [p[1] for p in t + v]
        lasts.append((v or t)[-1][1] if (v or t) else None)
    if logx:
        ax.set_xscale("log")
    lo, hi = min(xs_all), max(xs_all)
    if reference:
        for name, y in reference.items():
            mark_y(ax, y, name)
    if ylim == "auto":
        ylim = _auto_ylim(ys_all, [y for y in lasts if y is not None], list((reference or {}).values()))
    if ylim is not None:
        ax.set_ylim(*ylim)
    if budget:
        if lo <= budget <= hi * 1.05:
            mark_x(ax, budget, budget_label)
        from matplotlib.ticker import FuncFormatter

        top = ax.secondary_xaxis("top", functions=(lambda x: 100 * x / budget, lambda p: p * budget / 100))
        top.set_xlabel(
            f"% of {budget_label} compute ({_si(budget)}FLOPs)" if "FLOP" in xlabel else f"% of {budget_label}",
            fontsize=10,
            color="0.3",
        )
        if logx:
            top.set_xscale("log")
        top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
        top.tick_params(colors="0.3", labelsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, loc="left", fontweight="bold", pad=12 if budget else 6)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(frameon=False, loc="upper right")
    fig.tight_layout()
    return save_figure(fig, out_png)


def _auto_ylim(ys: list[float], lasts: list[float], refs: list[float]) -> tuple[float, float] | None:
    """Cut the top of the y axis when the curves' starts dwarf the spread of where they end."""
    if len(lasts) < 2 or not ys:
        return None
    lo, hi = min(ys + refs), max(ys + refs)
    end_spread = max(lasts + refs) - lo
    top = lo + max(3.0 * end_spread, 0.15 * (hi - lo))
    if top >= hi:
        return None
    pad = 0.04 * (top - lo)
    return lo - pad, top + pad


# -------------------------------------------------------------------------------------------- expert load


def plot_expert_load(
    matrix,
    out_png: str | Path,
    layer_ids: Sequence[int] | None = None,
    *,
    dropped: Sequence[float] | None = None,
    entropy: Sequence[float] | None = None,
    title: str = "Expert load",
    subtitle: str | None = None,
    annotate: bool | None = None,
) -> Path:
    """Heatmap of layers x experts. `matrix` holds token counts (or shares) per expert; each row is
    normalised to share x E, so a balanced layer is 1.0 everywhere (white), over-used experts are red and
    under-used blue. dropped: per-layer share of tokens dropped (or left unprocessed), shown on the right
    with `entropy` (the load entropy / log E) when given."""
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = pyplot()
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.size == 0:
        raise UpcycleError(f"expert load must be a non-empty layers x experts matrix, got shape {m.shape}")
    L, E = m.shape
    layer_ids = list(layer_ids) if layer_ids is not None else list(range(L))
    rel = m / np.clip(m.sum(1, keepdims=True), 1e-12, None) * E
    # Symmetric log colour scale around 1: twice the fair share is as red as half of it is blue.
    nonzero = rel[rel > 0]
    spread = max(rel.max(), 1.0 / nonzero.min() if nonzero.size else 1.0, 2.0)
    vmax = 2.0 ** min(math.ceil(math.log2(spread)), max(1, math.ceil(math.log2(min(E, 8)))))  # beyond 8x: saturate
    norm = LogNorm(vmin=1.0 / vmax, vmax=vmax)
    base = plt.get_cmap("RdBu_r")
    cmap = base.with_extremes(under=base(0.0), over=base(1.0))
    side = dropped is not None or entropy is not None
    width = min(16.0, max(6.0, 0.62 * E + 3.2 + (1.6 if side else 0)))
    height = min(14.0, max(3.2, 0.36 * L + 1.9))
    fig, ax = plt.subplots(figsize=(width, height))
    im = ax.imshow(np.clip(rel, 1e-9, None), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(E), [str(e) for e in range(E)] if E <= 32 else None)
    if E > 32:
        ax.set_xticks(range(0, E, max(1, E // 16)))
    step = 1 if L <= 40 else max(1, L // 30)
    ax.set_yticks(range(0, L, step), [str(layer_ids[j]) for j in range(0, L, step)])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    for s in ax.spines.values():
        s.set_visible(False)
    ax.set_xticks(np.arange(-0.5, E, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, L, 1), minor=True)
    ax.grid(which="minor", color="white", lw=1.0 if max(E, L) <= 32 else 0.4)
    ax.tick_params(which="minor", length=0)
    if annotate is None:
        annotate = E <= 16 and L <= 40
    if annotate:
        fs = 8 if E > 8 or L > 24 else 9
        for i in range(L):
            for e in range(E):
                v = rel[i, e]
                dark = abs(float(norm(max(v, 1e-9))) - 0.5) > 0.3
                ax.text(e, i, f"{v:.2f}", ha="center", va="center", fontsize=fs, color="white" if dark else "0.15")
    columns = ([("dropped", [f"{100 * x:.1f}%" for x in dropped])] if dropped is not None else []) + (
        [("H/log E", [f"{x:.2f}" for x in entropy])] if entropy is not None else []
    )
    for k, (head, cells) in enumerate(columns):  # small tables right of the heatmap, one column each
        dx = 8 + 54 * k
        ax.annotate(
            head,
            (1.0, -0.5),
            xycoords=("axes fraction", "data"),
            xytext=(dx, 4),
            textcoords="offset points",
            va="bottom",
            fontsize=9,
            fontweight="bold",
            color="0.2",
        )
        for i, cell in enumerate(cells):
            ax.annotate(
                cell,
                (1.0, i),
                xycoords=("axes fraction", "data"),
                xytext=(dx, 0),
                textcoords="offset points",
                va="center",
                fontsize=9,
                family="monospace",
                color="0.2",
            )
    cbar = fig.colorbar(
        im, ax=ax, fraction=0.04, pad=(0.15 + 0.55 * len(columns)) / (width - 2.2), aspect=25, extend="both"
    )
    ticks = [2.0**k for k in range(-int(math.log2(vmax)), int(math.log2(vmax)) + 1)]
    cbar.set_ticks(ticks, labels=[f"{t:g}" if t >= 1 else f"1/{1 / t:g}" for t in ticks])
    cbar.minorticks_off()
    cbar.set_label("share of tokens × E   (1 = balanced, log scale)")
    if subtitle:  # wrapped to the heatmap's width, so it never runs into the column heads on the right
        import textwrap

        heat_in = width - 2.2 - 0.75 * len(columns)  # minus labels, colour bar and side columns
        subtitle = textwrap.fill(subtitle, max(40, int(heat_in * 72 / (9.5 * 0.56))))
    lines = subtitle.count("\n") + 1 if subtitle else 0
    ax.set_title(title, loc="left", fontweight="bold", pad=8 + 14 * lines)
    if subtitle:
        ax.annotate(
            subtitle,
            (0, 1),
            xycoords="axes fraction",
            xytext=(0, 6),
            textcoords="offset points",
            fontsize=9.5,
            color="0.35",
            va="bottom",
        )
    fig.tight_layout()
    return save_figure(fig, out_png)


def plot_load(load, out_png: str | Path, title: str = "Expert load", subtitle: str | None = None) -> Path:
    """`plot_expert_load` of an `evaluate.ExpertLoad`: the router's choices (before any capacity cut) per
    layer and expert, with the dropped share on the right when a router has a capacity, and the load entropy."""
    ec = all(r.startswith("expert_choice") for r in load.routers)
    can_drop = any("C=" in r for r in load.routers)
    right = (["tokens no expert took" if ec else "tokens dropped"] if can_drop else []) + ["load entropy / log E"]
    routers = ", ".join(sorted(set(load.routers)))
    return plot_expert_load(
        load.demand,
        out_png,
        load.layers,
        dropped=load.dropped_token_share.tolist() if can_drop else None,
        entropy=load.load_entropy.tolist(),
        title=title,
        subtitle=subtitle or f"{load.tokens} tokens, router {routers}; right: {', '.join(right)}",
    )
