"""results.md of the regime study."""

from __future__ import annotations

import math

from upcycle.experiments.regime_recipe import RegimeRecipe


def _pm(m: float, s: float) -> str:
    return f"{m:.4f}" if math.isnan(s) else f"{m:.4f} ± {s:.4f}"


def _gap(g: dict | None) -> str:
    if not g:
        return ""
    s = "" if math.isnan(g["gap_std"]) else f" ± {g['gap_std']:.4f}"
    return f"{g['gap_mean']:+.4f}{s} (n={g['seeds']})"


def _machines(res: dict) -> str:
    """The CPUs the runs ran on, from their results; where some did not record it, the report's own machine,
    said as such."""
    runs = res.get("run_machines") or {}
    known = {cpu: n for cpu, n in runs.items() if cpu != "not recorded"}
    missing = runs.get("not recorded", 0)
    if not runs:
        return res["machine"]["cpu"]
    if not known:
        return f"{res['machine']['cpu']} (where this report was made; the runs did not record theirs)"
    if len(known) == 1 and not missing:
        return next(iter(known))
    text = "; ".join(f"{cpu} ({n} run{'s' * (n != 1)})" for cpu, n in known.items())
    return text + (f"; {missing} runs did not record theirs" if missing else "")


def results_markdown(res: dict, r: RegimeRecipe) -> str:
    m = res["machine"]
    d = res.get("dense")
    L = [f"# {r.name}: when does sparse upcycling beat dense continuation?", ""]
    if res["missing_runs"]:
        L += [
            f"**Partial results**: {len(res['missing_runs'])} run(s) have not finished "
            f"({', '.join(res['missing_runs'][:6])}{', ...' if len(res['missing_runs']) > 6 else ''}). "
            "Running the same command again resumes them.",
            "",
        ]
    fp = res["data"].get("fingerprint", {})
    L += [
        f"Machine: {_machines(res)}, {m['cores']} cores, {r.workers} runs side by side with {r.threads} torch "
        f"thread(s) each; torch {m['torch']}, transformers {m.get('transformers', '?')}, device {m['device']}.",
        f"Command: `{res.get('command')}`; the finished runs took {res['runs_wall_s'] / 3600:.2f} h of worker time "
        f"(the dense phases not counted).",
        f"Corpus `{r.corpus}`: {fp.get('documents', '?')} documents, {fp.get('chars', 0) / 1e6:.1f}M characters "
        f"(sha256 {str(fp.get('sha256', '?'))[:16]}…; versions {fp.get('versions')}), "
        f"{res['data'].get('train_tokens', 0) / 1e6:.1f}M training tokens ({r.vocab_size}-token byte-level BPE), "
        f"split by document; every evaluation on the same {res['data'].get('eval_sequences', '?')} held-out "
        f"sequences of {r.seq_len} tokens.",
        "",
    ]
    L += [
        "## Protocol (fixed before the runs)",
        "",
        f"- Dense phase: Llama from scratch, warmup {r.warmup} steps, then a constant LR {r.lr:g} (the stable phase "
        "of a warmup-stable-decay run); each branch point is a stable-phase checkpoint.",
        f"- Every continued arm starts from the same checkpoint bytes, re-warms over {r.rewarm:.0%} of B, runs "
        f"at {r.lr:g}, and decays linearly to {r.final_lr_ratio:g}× over the last {r.decay_fraction:.0%} of each "
        "budget (one decay branch per budget off one stable run). Optimizer: "
        f"{r.optimizer} for every arm unless the arm says otherwise.",
        "- Budgets: extra FLOPs of " + ", ".join(f"+{x:.0%}" for x in r.extra) + " of B (B = the dense FLOPs "
        "to the branch point; forward + backward, active parameters, attention). Scratch arms: B + extra; the "
        "positive control: the dense arm's tokens.",
        "- Seeds: data order and router/expert initialisation; gaps are paired by seed (same data order).",
        "- No sequence is read twice in a run.",
        "",
    ]
    if d:
        mm = d["model"]
        L += [
            "## Main setting",
            "",
            f"Dense model: d={mm['hidden_size']}, d_ff={mm['intermediate_size']}, {mm['num_layers']} layers, "
            f"{mm['num_heads']} heads, {d['non_embedding_params']:,} non-embedding parameters, trained on "
            f"{d['tokens']:,} tokens = **{d['tokens_per_param']:.0f} tokens per non-embedding parameter**; "
            f"validation loss at the branch point {d['val_loss']:.4f}.",
            "",
        ]
    if res["arms"]:
        L += [
            "| arm | kind | " + " | ".join(f"+{x:.0%}" for x in r.extra) + " | start | FLOPs/token |",
            "|---|---|" + "---|" * (len(r.extra) + 2),
        ]
        for arm, a in res["arms"].items():
            cells = [_pm(p["val_loss_mean"], p["val_loss_std"]) + f" (n={p['seeds']})" for p in a["points"]]
            L.append(
                f"| {arm} | {a['kind']}{', carry' if a['optimizer'] == 'carry' else ''} | "
                + " | ".join(cells)
                + f" | {a['start_val_loss']:.4f} | {a['flops_per_token']:,} |"
            )
        L += [
            "",
            "Gap to dense continuation at equal FLOPs (arm − dense, paired by seed; negative: the arm wins):",
            "",
            "| arm | " + " | ".join(f"+{x:.0%}" for x in r.extra) + " |",
            "|---|" + "---|" * len(r.extra),
        ]
        for arm, a in res["arms"].items():
            if arm != "dense":
                L.append(f"| {arm} | " + " | ".join(_gap(g) for g in a["gap_vs_dense"]) + " |")
        L += [""]
        if res["crossing"]:
            L += ["Where an arm's stable-phase curve (mean over seeds) first goes below dense continuation's:", ""]
            for arm, c in res["crossing"].items():
                L.append(
                    f"- {arm}: at +{c['extra_share']:.1%} of B, step {int(c['step']):,}, {int(c['tokens']):,} tokens"
                )
            L += [""]
        if res.get("best_other_arm"):
            L += [f"Best other arm at the largest budget (run at every map point): **{res['best_other_arm']}**.", ""]
    if res["map"]:
        L += [
            "## Crossover map (upcycled − dense at equal FLOPs; mean ± std over paired seeds)",
            "",
            "| size | tokens/param | extra | upcycled − dense | best other − dense |",
            "|---|---|---|---|---|",
        ]
        for g in res["map"]:
            other = ""
            if "best_other_gap_mean" in g:
                other = (
                    _gap(
                        {
                            "gap_mean": g["best_other_gap_mean"],
                            "gap_std": g["best_other_gap_std"],
                            "seeds": g["best_other_seeds"],
                        }
                    )
                    + f" ({g['best_other']})"
                )
            L.append(f"| {g['size']} | {g['tokens_per_param']:g} | +{g['extra']:.0%} | {_gap(g)} | {other} |")
        L += ["", "Crossover (tokens per parameter where upcycled − dense turns negative, log-interpolated):", ""]
        for s, per in res["crossover"].items():
            cells = [
                f"+{float(x):.0%}: " + (v if isinstance(v, str) else "no single crossing" if v is None else f"{v:.0f}")
                for x, v in per.items()
            ]
            L.append(f"- {s}: " + ", ".join(cells))
        L += [""]
    L += ["Figures: " + ", ".join(f"`{f}`" for f in res.get("figures", [])), ""]
    return "\n".join(L)
