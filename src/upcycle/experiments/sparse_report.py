"""The sparse-upcycling study's results: the markdown table and the loss-vs-compute figure."""

from __future__ import annotations

import json
from pathlib import Path

from upcycle.experiments.recipe import ARMS, LABELS


def _fmt_flops(v: float) -> str:
    return f"{v:.3g}"


def results_markdown(rows: list[dict], info: dict) -> str:
    r = info["recipe"]
    m = info["machine"]
    arms = list(dict.fromkeys(x["arm"] for x in rows))
    targets = sorted({x["target_extra"] for x in rows})
    B = info["B_flops"]
    lines = [f"# {r['name']}: validation loss at equal extra compute", ""]
    if r["model"] == "smollm2" or isinstance(r["model"], str):
        lines += [
            f"Start: SmolLM2-135M-Instruct (dense). B (the unit of extra compute) = dense FLOPs of "
            f"{r['reference_tokens']:,} tokens = {_fmt_flops(B)} FLOPs; SmolLM2's own pretraining is not B."
        ]
    else:
        mm = r["model"]
        lines += [
            f"Dense Llama from scratch: d={mm['hidden_size']}, d_ff={mm['intermediate_size']}, "
            f"{mm['num_layers']} layers, {mm['num_heads']} heads, {info['tokenizer']}, tied embeddings; "
            f"pretrained for B = {info['pretrain_tokens']:,} tokens = {_fmt_flops(B)} FLOPs."
        ]
    p = info["plan"]
    lines += [
        f"Corpus `{r['corpus']}` ({info['data']['train_sequences']:,} train / {info['data']['val_sequences']:,} "
        f"val sequences of {r['seq_len']} tokens, split by document); validation loss on the same "
        f"{min(r['eval_batches'] * r['batch_size'], info['data']['val_sequences'])} held-out sequences for "
        "every point.",
        f"Dense checkpoint validation loss: **{info['dense_val_loss']:.4f}**. Upcycling plan: "
        f"E={p['num_experts']}, top-{p['top_k']}, layers {p['layers']}, aux {p['aux_loss_coef']}.",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['threads']} torch thread(s); the machine was shared, "
        f"load average {m.get('load_average_1min', '?')} at the end), device {m['device']}, torch {m['torch']}"
        f"; the runs took {info['runs_wall_s'] / 60:.1f} min (training and evaluation).",
    ]
    if r.get("variants"):
        lines += [
            "Upcycled variants (plan keys over the plan above): "
            + "; ".join(f"**{n}** `{json.dumps(v)}`" for n, v in r["variants"].items())
            + "."
        ]
    if info.get("command"):
        lines += [f"Command: `{info['command']}`"]
    lines += [""]
    lines += ["## Validation loss by extra compute (fraction of B)", ""]
    head = "| extra compute | " + " | ".join(_label(a) for a in arms) + " |"
    lines += [head, "|" + "---|" * (len(arms) + 1)]
    by = {(x["arm"], x["target_extra"]): x for x in rows}
    for t in targets:
        cells = []
        vals = {a: by[(a, t)]["val_loss"] for a in arms if (a, t) in by}
        best = min(vals.values()) if vals else None
        for a in arms:
            x = by.get((a, t))
            if x is None:
                cells.append("")
                continue
            s = f"{x['val_loss']:.4f}"
            cells.append(f"**{s}**" if len(vals) > 1 and x["val_loss"] == best else s)
        lines.append(f"| {t:.0%} | " + " | ".join(cells) + " |")
    if "moe_scratch" in arms:
        lines += [
            "",
            "MoE from scratch: its 0% point is after B FLOPs of its own training from a random init; each "
            "later point after B + extra.",
        ]
    if len(arms) > 2:
        top = targets[-1]
        ranked = sorted((by[(a, top)] for a in arms if (a, top) in by), key=lambda x: x["val_loss"])
        ref = by.get(("upcycled", top)) or by.get(("dense", top))
        lines += [
            "",
            f"## Ranking at {top:.0%} extra compute (equal FLOPs)",
            "",
            f"| rank | arm | val loss | vs {ref['arm'] if ref else '-'} | FLOPs/token | steps |",
            "|---|---|---|---|---|---|",
        ]
        for k, x in enumerate(ranked, 1):
            d = f"{x['val_loss'] - ref['val_loss']:+.4f}" if ref else ""
            lines.append(
                f"| {k} | {_label(x['arm'])} | {x['val_loss']:.4f} | {d} | {x['flops_per_token']:,} | {x['step']} |"
            )
    lines += [
        "",
        "## Every point",
        "",
        "| arm | target extra | step | tokens | training FLOPs | extra FLOPs | extra / B | val loss | val ppl "
        "| train time (s) | FLOPs/token |",
        "|" + "---|" * 11,
    ]
    for x in rows:
        lines.append(
            f"| {x['arm']} | {x['target_extra']:.0%} | {x['step']} | {x['tokens']:,} | "
            f"{_fmt_flops(x['flops'])} | {_fmt_flops(x['extra_flops'])} | {x['extra_share']:.1%} | "
            f"{x['val_loss']:.4f} | {x['val_ppl']:.2f} | {x['train_time_s']:.0f} | {x['flops_per_token']:,} |"
        )
    lines += [
        "",
        "FLOPs: `upcycle.train.flops_per_token` for every arm (6 x active parameters + attention, forward + "
        "backward; experts counted top-k times, the router included). Train time: optimizer steps only, no "
        "evaluation.",
        "",
    ]
    return "\n".join(lines)


def _colour(arm: str) -> str:
    from upcycle.eval.plots import PALETTE

    if arm not in ARMS and arm != "pretrain":  # a plan variant: a colour of its own, by its first use
        import matplotlib

        n = _VARIANT_COLOURS.setdefault(arm, len(_VARIANT_COLOURS))
        return matplotlib.colors.to_hex(matplotlib.colormaps["tab20"]((2 * n + 1 + n // 10) % 20))
    return "#333333" if arm == "pretrain" else PALETTE[ARMS.index(arm) % len(PALETTE)]


_VARIANT_COLOURS: dict[str, int] = {}


def _label(arm: str) -> str:
    return LABELS.get(arm, f"upcycled: {arm}")


def plot(curves: dict, rows: list[dict], info: dict, out_png: Path) -> Path:
    """Left: validation loss vs extra compute (% of B), one curve per arm, the budgets marked. Right (a
    model pretrained here): the same runs against all their training FLOPs, the dense pretraining included,
    so MoE-from-scratch is seen from its start."""
    from upcycle.eval.plots import mark_x, mark_y, pyplot, save_figure

    plt = pyplot()
    B = info["B_flops"]
    whole = info.get("whole_curves") or {}
    two = "pretrain" in whole
    fig, axes = plt.subplots(
        1,
        2 if two else 1,
        figsize=(15, 5.6) if two else (8.5, 5.2),
        gridspec_kw={"width_ratios": [1.25, 1]} if two else None,
    )
    ax = axes[0] if two else axes
    targets = sorted({x["target_extra"] for x in rows if x["target_extra"] > 0})
    for t in targets:
        ax.axvline(100 * t, color="0.75", ls=":", lw=1.0, zorder=0)
    label = f"dense checkpoint {info['dense_val_loss']:.3f}"
    mark_y(ax, info["dense_val_loss"], label, ls="--", lw=1.0, at=0.01, boxed=False, zorder=0)
    ys = []
    for arm, pts in curves.items():
        pts = sorted(pts)
        if not pts:
            continue
        c = _colour(arm)
        xs = [100 * x / B for x, _ in pts]
        vs = [y for _, y in pts]
        bud = sorted((x for x in rows if x["arm"] == arm), key=lambda x: x["extra_share"])
        ax.plot(xs, vs, color=c, lw=1.6, alpha=0.9, label=f"{_label(arm)}  ({bud[-1]['val_loss']:.3f})")
        ax.plot([100 * x["extra_share"] for x in bud], [x["val_loss"] for x in bud], "o", color=c, ms=6)
        ys += vs
    lo = min(ys + [info["dense_val_loss"]])
    finals = [x["val_loss"] for x in rows]
    hi = max(max(finals), info["dense_val_loss"])
    pad = 0.15 * (hi - lo) + 1e-3
    if max(ys) > hi + pad:
        ax.set_ylim(lo - pad, hi + 3 * pad)
    r = info["recipe"]
    unit = (
        f"B = {B:.3g} FLOPs = the dense model on {r['reference_tokens']:,} tokens"
        if r.get("reference_tokens")
        else f"B = {B:.3g} FLOPs = the dense pretraining"
    )
    ax.set_xlabel(f"extra training compute, % of B\n({unit}; dots: the budgets in the table)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{r['name']}: validation loss vs extra compute", loc="left", fontweight="bold")
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=True, framealpha=0.9, edgecolor="none", loc="upper right", fontsize=9, bbox_to_anchor=(1.0, 0.93))
    if two:
        ax2 = axes[1]
        for arm, pts in whole.items():
            if not pts:
                continue
            label = "dense pretraining (B)" if arm == "pretrain" else _label(arm)
            ax2.plot(
                [100 * x / B for x, _ in pts],
                [y for _, y in pts],
                color=_colour(arm),
                lw=2.2 if arm == "pretrain" else 1.5,
                label=label,
            )
        mark_x(ax2, 100, "end of dense pretraining", lw=1.0, line="0.35", at=0.03)
        x0 = 60.0  # the last stretch of pretraining and everything after it
        allv = [y for pts in whole.values() for x, y in pts if 100 * x / B >= x0]
        ax2.set_xlim(x0, max(100 * x / B for pts in whole.values() for x, _ in pts) + 3)
        ax2.set_ylim(lo - pad, max(allv) + pad)
        ax2.set_xlabel("all training compute, % of B (pretraining included; from 60%)")
        ax2.set_ylabel("validation loss")
        ax2.set_title("the same runs from their start", loc="left", fontweight="bold")
        ax2.grid(True, alpha=0.3)
        ax2.legend(frameon=False, loc="upper right", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_png)
