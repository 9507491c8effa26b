"""The BAM vs BTX study's results: markdown, findings and the figure."""

from __future__ import annotations

import csv
from pathlib import Path

from upcycle.experiments.bam_recipe import LABELS, MIXES


def _curve(path: Path) -> list[tuple[float, float]]:
    if not path.is_file():
        return []
    with open(path) as fh:
        return [(float(x["flops"]), float(x["val_loss"])) for x in csv.DictReader(fh) if x.get("val_loss")]


def results_markdown(rows: list[dict], info: dict) -> str:
    r, m = info["recipe"], info["machine"]
    names = list(r["domains"])
    mm = r["model"]
    lines = [
        f"# {r['name']}: BAM vs BTX, per-domain perplexity",
        "",
        f"Seed: transformers' Cohere block (parallel attention: y = x + Attn(LN x) + MLP(LN x)), "
        f"d={mm['hidden_size']}, d_ff={mm['intermediate_size']}, {mm['num_layers']} layers, {mm['num_heads']} "
        f"heads / {mm.get('num_kv_heads', mm['num_heads'])} KV heads, {info['tokenizer']}, tied embeddings, "
        f"pretrained from scratch for {r['pretrain_steps']} steps of {r['batch_size']} x {r['seq_len']} tokens "
        f"on the union of the domains.",
        f"Specialists: {r['branch_steps']} steps each on their domain with {r['general_share']:.0%} of the "
        f"union mixed in. Mixtures (N = {info['num_experts']}: the seed + {len(names)} specialists): "
        f"{r['mix_steps']} steps on an equal mix of the domains, constant LR {r['mix_lr']} after warmup. "
        "DM = data matched (same tokens as BTX); CM = compute matched (the step where the arm's training "
        "FLOPs reach BTX's total).",
        "Domains: "
        + ", ".join(
            f"`{k}` = {v} ({info['data'][k]['train_sequences']:,} train sequences, "
            f"{info['data'][k]['eval_sequences']} held-out sequences evaluated)"
            for k, v in r["domains"].items()
        )
        + ".",
        f"Machine: {m['cpu']}, {m['cores']} cores, {r['threads']} torch thread(s), shared with other jobs "
        f"(load average {m.get('load_average_1min', '?')} at the end), torch {m['torch']}; the whole "
        f"experiment took {info['wall_s'] / 60:.1f} min.",
        "",
    ]
    if info.get("command"):
        lines += [f"Command: `{info['command']}`", ""]
    lines += [
        "## Perplexity on held-out documents (lower is better)",
        "",
        "| model | " + " | ".join(names) + " | average | steps | training FLOPs |",
        "|" + "---|" * (len(names) + 4),
    ]
    mixtures = [x for x in rows if x["kind"] == "mixture"]
    best = min(x["ppl_avg"] for x in mixtures) if mixtures else None
    for x in rows:
        avg = f"{x['ppl_avg']:.2f}"
        if x["kind"] == "mixture" and x["ppl_avg"] == best:
            avg = f"**{avg}**"
        lines.append(
            f"| {x['model']} | "
            + " | ".join(f"{x['ppl_' + n]:.2f}" for n in names)
            + f" | {avg} | {x['steps']} | {x['train_flops']:.3g} |"
        )
    lines += ["", "Seed and specialists: steps and FLOPs of their own training (the seed's pretraining for the seed)."]
    lines += _findings(rows)
    lines += [
        "",
        "## Cost per token",
        "",
        "| model | total params | active params | training FLOPs / token | forward FLOPs / token | "
        "greedy generation, KV cache (ms / token) | forward of "
        f"{r['seq_len']} tokens (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {"dense": "dense (seed, each specialist)", **LABELS}
    for k, c in info["costs"].items():
        lines.append(
            f"| {labels[k]} | {c['total_params']:,} | {c['active_params']:,} | {c['flops_per_token']:,} | "
            f"{c['flops_per_token'] / 3:,.0f} | {c['ms_per_token_generate']:.2f} | {c['ms_per_forward']:.1f} |"
        )
    lines += [
        "",
        "FLOPs: `upcycle.train.flops_per_token` (6 x active parameters + 12 x layers x attention width x "
        "seq_len, forward + backward; FFN experts counted top-k times, every attention expert counted (soft "
        "routing), routers included; forward = one third). Latency: batch 1, "
        f"{r['latency_prompt']}-token prompt, {r['latency_new_tokens']} greedy tokens, median of "
        f"{r['latency_repeats']}, on a shared CPU (indicative only).",
        "",
    ]
    return "\n".join(lines)


def _findings(rows: list[dict]) -> list[str]:
    """The paper's claims checked against this run's numbers (BAM < BTX on average perplexity; KV sharing
    between the two), one line each."""
    by = {x["model"]: x["ppl_avg"] for x in rows}
    btx = by.get("BTX")
    if btx is None:
        return []
    out = ["", "## The paper's finding, checked", ""]
    for name in ("BAM, KV experts (DM)", "BAM, KV experts (CM)", "BAM, KV shared (DM)", "BAM, KV shared (CM)"):
        if name in by:
            d = 100 * (by[name] - btx) / btx
            out.append(
                f"- {name}: average perplexity {by[name]:.2f} vs BTX {btx:.2f} "
                f"({d:+.1f}%: BAM {'<' if by[name] < btx else '>='} BTX)"
            )
    for tag in ("DM", "CM"):
        e, s = by.get(f"BAM, KV experts ({tag})"), by.get(f"BAM, KV shared ({tag})")
        if e is not None and s is not None:
            between = min(e, btx) <= s <= max(e, btx)
            out.append(
                f"- {tag}: KV shared {s:.2f} is {'between' if between else 'not between'} KV experts {e:.2f} "
                f"and BTX {btx:.2f}"
            )
    return out


def plot(rows: list[dict], curves: dict, info: dict, out_png: Path) -> Path:
    """Left: the mixtures' equal-mix validation loss vs training FLOPs (BTX's total marked: the compute
    match). Right: per-domain perplexity of every model."""
    from upcycle.eval.plots import PALETTE, mark_x, pyplot, save_figure

    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 5.6), gridspec_kw={"width_ratios": [1, 1.3]})
    colours = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(MIXES)}
    for m, pts in curves.items():
        if pts:
            ax.plot(
                [x for x, _ in pts],
                [y for _, y in pts],
                "-o",
                ms=3,
                color=colours[m],
                lw=1.6,
                label=f"{LABELS[m]}  ({pts[-1][1]:.3f})",
            )
    if info.get("btx_flops"):
        mark_x(ax, info["btx_flops"], "BTX's compute (CM)", ls=":", lw=1.0, line="0.5", text="0.35")
    ax.set_xlabel("mixture training FLOPs")
    ax.set_ylabel("validation loss (equal mix of the domains)")
    ax.set_title(f"{info['recipe']['name']}: mixture training", loc="left", fontweight="bold")
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False, fontsize=9)
    names = list(info["recipe"]["domains"]) + ["avg"]
    n = len(rows)
    width = 0.8 / n
    for i, x in enumerate(rows):
        vals = [x[f"ppl_{d}"] for d in names]
        c = "0.35" if x["model"] == "seed" else ("0.7" if x["kind"] == "dense" else PALETTE[(i + 1) % len(PALETTE)])
        ax2.bar(
            [j + (i - n / 2 + 0.5) * width for j in range(len(names))],
            vals,
            width,
            color=c,
            edgecolor="white",
            lw=0.5,
            label=x["model"],
            hatch="//" if "(CM)" in x["model"] else None,
        )
    ax2.set_xticks(range(len(names)), names)
    ax2.set_yscale("log")
    ax2.set_ylabel("perplexity (log scale)")
    ax2.set_title("per-domain perplexity on held-out documents", loc="left", fontweight="bold")
    ax2.grid(True, axis="y", alpha=0.3)
    ax2.legend(frameon=False, fontsize=8, ncol=2)
    fig.tight_layout()
    return save_figure(fig, out_png)
