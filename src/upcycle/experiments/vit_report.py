"""The ViT study's results: rows, csv, markdown summary and the figure."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def _row(arm: str, seed: int, budget: float, steps: int, extra: float, r: dict, wall: float = 0.0) -> dict:
    return {
        "arm": arm,
        "seed": seed,
        "budget": budget,
        "steps": steps,
        "extra_compute": round(extra, 4),
        **{k: round(v, 5) for k, v in r.items()},
        "wall_s": round(wall, 1),
    }


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _summary(rows: list[dict]) -> dict[tuple[str, float], dict[str, tuple[float, float, int]]]:
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["budget"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        out[key] = {
            m: (float(np.mean([r[m] for r in rs])), float(np.std([r[m] for r in rs])), len(rs))
            for m in ("accuracy", "probe_accuracy", "test_loss", "tokens_left_behind", "steps")
        }
    return out


def results_markdown(rows: list[dict], info: dict) -> str:
    from upcycle.eval.perplexity import markdown_table

    rec = info["recipe"]
    summ = _summary(rows)
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    budgets = sorted({r["budget"] for r in rows})

    def cell(arm, b, m):
        if (arm, b) not in summ or (arm == "dense" and m == "tokens_left_behind"):
            return "-"
        mean, sd, n = summ[(arm, b)][m]
        return f"{100 * mean:.1f}" + (f" ± {100 * sd:.1f}" if n > 1 else "")

    lines = [
        f"# {rec['name']}: sparse upcycling of a small ViT (digits 8x8)",
        "",
        f"{info['date']}, {info['machine'].get('cpu', '?')}; `{info['command']}`; {info['wall_s'] / 60:.1f} min.",
        "",
        f"Dense ViT ({rec['model']}) pretrained {rec['pretrain_steps']} steps of {rec['batch_size']} images: "
        f"test accuracy {100 * info['pretrained']['accuracy']:.1f}%, {rec['shots']}-shot linear probe "
        f"{100 * info['pretrained']['probe_accuracy']:.1f}%. Plan: {rec['plan']}. "
        f"Means over {rec['seeds']} continuation seed(s) (± one standard deviation); test set "
        f"{rec['test_size']} images, so one image is {100 / rec['test_size']:.2f} points.",
        "",
    ]
    for m, title in (
        ("accuracy", "Test accuracy (%)"),
        ("probe_accuracy", f"{rec['shots']}-shot linear probe (%)"),
        ("tokens_left_behind", "Tokens no expert picked (%, mean over MoE layers)"),
    ):
        header = ["arm"] + [("start" if b == 0 else f"+{b:.0%} of B") for b in budgets]
        lines += [f"## {title}", "", markdown_table(header, [[a] + [cell(a, b, m) for b in budgets] for a in arms]), ""]
    header = ["arm", "FLOPs / image", "steps at the largest budget"]
    steps_rows = []
    for a in arms:
        fpi = info["flops_per_image"].get(a)
        steps_rows.append([a, f"{fpi:.3g}" if fpi else "-", f"{summ[(a, budgets[-1])]['steps'][0]:.0f}"])
    lines += ["## Compute", "", markdown_table(header, steps_rows), ""]
    return "\n".join(lines)


def plot(rows: list[dict], curves: dict, info: dict, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = _summary(rows)
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    budgets = sorted({r["budget"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, m, title in (
        (axes[0], "accuracy", "test accuracy"),
        (axes[1], "probe_accuracy", f"{info['recipe']['shots']}-shot linear probe"),
    ):
        for a in arms:
            xs = [b for b in budgets if (a, b) in summ]
            ys = [100 * summ[(a, b)][m][0] for b in xs]
            es = [100 * summ[(a, b)][m][1] for b in xs]
            ax.errorbar([100 * x for x in xs], ys, yerr=es, marker="o", capsize=3, label=a)
        ax.set_xlabel("extra compute (% of dense pretraining FLOPs)")
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{info['recipe']['name']}: ViT on digits, dense continued vs upcycled (expert choice)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
