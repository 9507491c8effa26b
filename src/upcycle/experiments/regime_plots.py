"""The regime study's figures: the main setting's budgets (by FLOPs and by tokens), its stable-phase
curves, routing over training, and the crossover map as a heatmap."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from upcycle.eval.plots import PALETTE, pyplot, save_figure
from upcycle.experiments.regime_recipe import RegimeRecipe

# The protocol's two treatment switches, as arm names spell them: the optimizer carried, the continued arms' decay.
VARIANT_SUFFIXES = ("_carry", "_short_decay")


def _base(r: RegimeRecipe, arm: str) -> str | None:
    """The arm this one is a treatment variant of (dense_carry of dense, moe_scratch_short_decay of moe_scratch),
    None for an arm of its own."""
    for suffix in VARIANT_SUFFIXES:
        if arm.endswith(suffix) and arm[: -len(suffix)] in r.arms:
            return arm[: -len(suffix)]
    return None


def _colour(r: RegimeRecipe, arm: str) -> str:
    """Arms of their own take the palette in recipe order; a variant takes its base arm's colour."""
    own = [a for a in r.arms if _base(r, a) is None]
    base = _base(r, arm) or arm
    return PALETTE[own.index(base) % len(PALETTE)]


def _style(r: RegimeRecipe, arm: str) -> str:
    """A variant is dashed in its base arm's colour."""
    return "--" if _base(r, arm) else "-"


def plot_budgets(res: dict, r: RegimeRecipe, out_png: Path) -> Path | None:
    if not res["arms"] or "dense" not in res:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.4), sharey=True)
    T = res["dense"]["tokens"]
    for arm, a in res["arms"].items():
        pts = a["points"]
        ys = [p["val_loss_mean"] for p in pts]
        es = [0 if math.isnan(p["val_loss_std"]) else p["val_loss_std"] for p in pts]
        n = max(p["seeds"] for p in pts)
        label = f"{arm} (n={n}" + (", the dense arm's tokens)" if a["kind"] == "dense_wide_scratch" else ")")
        scratch = a["kind"] in ("moe_scratch", "dense_wide_scratch")
        xs_f = [100 * p["extra"] for p in pts]
        xs_t = [100 * (p["tokens"] - (0 if not scratch else T)) / T for p in pts]
        for ax, xs in ((axes[0], xs_f), (axes[1], xs_t)):
            ax.errorbar(
                xs,
                ys,
                yerr=es,
                color=_colour(r, arm),
                ls=_style(r, arm),
                marker="o",
                ms=5,
                capsize=3,
                lw=1.5,
                label=label,
            )
    for ax in axes:
        ax.axhline(res["dense"]["val_loss"], color="0.4", ls=":", lw=1)
        ax.grid(True, alpha=0.3)
    axes[0].set_xlabel("extra FLOPs, % of B (the dense pretraining's)\nscratch arms: their total − B")
    axes[1].set_xlabel("extra tokens, % of the dense pretraining's\nscratch arms: their total − those")
    axes[0].set_ylabel("validation loss (mean ± std over seeds)")
    d = res["dense"]
    fig.suptitle(
        f"{r.name}: validation loss at each budget ({d['non_embedding_params'] / 1e3:.0f}k non-embedding "
        f"parameters, branched at {d['tokens_per_param']:.0f} tokens/parameter)",
        x=0.01,
        ha="left",
        fontweight="bold",
    )
    axes[0].set_title("by FLOPs", loc="left")
    axes[1].set_title("by tokens", loc="left")
    axes[1].legend(frameon=False, fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return save_figure(fig, out_png)


def plot_curves(runs: dict, res: dict, r: RegimeRecipe, out_png: Path) -> Path | None:
    """Stable-phase validation loss and routing (entropy, max/mean expert load) along each arm's run."""
    size, tpp = r.main["size"], float(r.main["tokens_per_param"])
    arms = [a for a in r.arms if (size, tpp, a) in runs and r.arms[a]["kind"] != "dense_wide_scratch"]
    if not arms:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    for arm in arms:
        rs = runs[(size, tpp, arm)]
        c0 = rs[0]["curve"]
        n = min(len(x["curve"]["step"]) for x in rs)
        B = rs[0]["B_flops"]
        scratch = rs[0]["kind"] in ("moe_scratch", "dense_wide_scratch")
        xs = [100 * (c0["flops"][i] - (B if scratch else 0)) / B for i in range(n)]
        ys = [statistics.fmean(x["curve"]["val_loss"][i] for x in rs) for i in range(n)]
        kw = dict(color=_colour(r, arm), ls=_style(r, arm), lw=1.4, label=arm)
        axes[0].plot(xs, ys, **kw)
        for ax, key in ((axes[1], "router_entropy"), (axes[2], "expert_load_max_over_mean")):
            vals = c0.get(key) or []
            if any(v is not None for v in vals[:n]):
                ax.plot([x for x, v in zip(xs, vals) if v is not None], [v for v in vals[:n] if v is not None], **kw)
    axes[0].set_ylabel("validation loss (mean over seeds)")
    if "dense" in res:
        axes[0].axhline(res["dense"]["val_loss"], color="0.4", ls=":", lw=1)
        lo = min(a["points"][-1]["val_loss_mean"] for a in res["arms"].values()) if res["arms"] else None
        if lo is not None:
            axes[0].set_ylim(lo - 0.05, res["dense"]["val_loss"] + 0.15)
    axes[0].set_xlim(-5, 105)
    axes[1].set_ylabel("router entropy (nats, mean over MoE layers; seed 0)")
    axes[2].set_ylabel("max / mean expert load (seed 0)")
    for ax, t in zip(axes, ("stable phase of the largest budget", "routing entropy", "expert load balance")):
        ax.set_xlabel("extra FLOPs, % of B")
        ax.set_title(t, loc="left", fontweight="bold")
        ax.grid(True, alpha=0.3)
    axes[0].legend(frameon=False, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_png)


def plot_map(res: dict, r: RegimeRecipe, out_png: Path) -> Path | None:
    rows = res["map"]
    sizes = [s for s in r.sizes if any(m["size"] == s for m in rows)]
    if not sizes:
        return None
    plt = pyplot()
    import numpy as np

    fig, axes = plt.subplots(
        1, len(sizes), figsize=(7.5 * len(sizes), 4.6), squeeze=False, gridspec_kw={"wspace": 0.25}
    )
    vmax = max(abs(m["gap_mean"]) for m in rows) or 1.0
    for ax, s in zip(axes[0], sizes):
        tpps = sorted({m["tokens_per_param"] for m in rows if m["size"] == s})
        grid = np.full((len(r.extra), len(tpps)), np.nan)
        for m in rows:
            if m["size"] == s:
                i, j = list(r.extra).index(m["extra"]), tpps.index(m["tokens_per_param"])
                grid[i, j] = m["gap_mean"]
                sd = "" if math.isnan(m["gap_std"]) else f"\n±{m['gap_std']:.3f}"
                ax.text(j, i, f"{m['gap_mean']:+.3f}{sd}\nn={m['seeds']}", ha="center", va="center", fontsize=8)
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", origin="lower")
        ax.set_xticks(range(len(tpps)), [f"{t:g}" for t in tpps])
        ax.set_yticks(range(len(r.extra)), [f"+{x:.0%}" for x in r.extra])
        ax.set_xlabel("dense tokens per non-embedding parameter")
        if s == sizes[0]:
            ax.set_ylabel("extra compute (share of B)")
        m = r.sizes[s]
        ax.set_title(
            f"{s}: d={m['hidden_size']}, {m['num_layers']} layers (upcycled − dense)", loc="left", fontweight="bold"
        )
    fig.colorbar(im, ax=axes[0].tolist(), label="val loss: upcycled − dense (blue: upcycling wins)")
    return save_figure(fig, out_png)


def plot_all(res: dict, runs: dict, r: RegimeRecipe, out: Path) -> list[str]:
    figs = [
        plot_budgets(res, r, out / "main_budgets.png"),
        plot_curves(runs, res, r, out / "main_curves.png"),
        plot_map(res, r, out / "map_heatmap.png"),
    ]
    return [p.name for p in figs if p is not None]
