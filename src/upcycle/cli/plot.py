"""Draw loss against training compute for one or more training runs, on one figure.

    upcycle plot RUN [RUN ...] --out loss.png [--label NAME ...] [--x flops|tokens|step] [--budget FLOPS]

Each RUN is a training run's metrics.csv or the directory holding it. x is the first of the columns
flops, tokens, step that the files have (or --x); y is val_loss, drawn with markers, over the training
loss drawn faintly in the same colour (--no-train leaves it out). Rows with an empty cell are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from upcycle.errors import UpcycleError

HELP = "loss vs training compute of one or more runs (metrics.csv) as a PNG"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", type=Path, nargs="+", help="metrics.csv files or training run directories")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--label", action="append", help="legend label per run, in order (default: run directory name)")
    p.add_argument("--x", choices=("flops", "tokens", "step"), help="x axis column (default: flops if present)")
    p.add_argument(
        "--budget",
        type=float,
        help="compute budget in FLOPs (e.g. the dense pretraining compute): adds a top axis in %% of it",
    )
    p.add_argument("--budget_label", "--budget-label", default="dense pretraining", help="name of the budget")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--no-train", "--no_train", dest="train", action="store_false", help="draw only the validation loss")
    p.add_argument("--linear-x", "--linear_x", dest="logx", action="store_false", help="linear x axis")


def _label(path: Path) -> str:
    d = path if path.is_dir() else path.parent
    return d.resolve().name or str(path)


def run(args: argparse.Namespace) -> int:
    from upcycle.eval.plots import X_LABELS, metrics_curves, plot_loss_vs_flops, read_metrics

    if args.label and len(args.label) != len(args.runs):
        raise UpcycleError(f"--label given {len(args.label)} times for {len(args.runs)} runs; give one per run")
    if args.out.suffix.lower() != ".png":
        raise UpcycleError(f"--out {args.out}: the figure is written as PNG; name it *.png")
    if args.budget is not None and not 0 < args.budget < float("inf"):
        raise UpcycleError(f"--budget must be a positive number of FLOPs, got {args.budget}")
    labels = args.label or [_label(r) for r in args.runs]
    if len(set(labels)) != len(labels):
        labels = [str(r) for r in args.runs]
    val, train, xcols = {}, {}, set()
    for label, path in zip(labels, args.runs):
        src = str(path / "metrics.csv" if path.is_dir() else path)
        xc, t, v = metrics_curves(read_metrics(path), args.x, source=src)
        xcols.add(xc)
        if v:
            val[label] = v
        if t and (args.train or not v):
            train[label] = t
    if len(xcols) > 1:
        raise UpcycleError(f"the runs have different x columns ({', '.join(sorted(xcols))}); choose one with --x")
    xc = xcols.pop()
    has_val = bool(val)
    title = args.title or ("Validation loss" if has_val else "Training loss") + f" vs {X_LABELS[xc]}"
    budget = args.budget if xc == "flops" else None
    if args.budget is not None and budget is None:
        print(f"upcycle: note: --budget ignored, the x axis is {xc}", file=sys.stderr)
    out = plot_loss_vs_flops(
        val,
        args.out,
        train=train,
        title=title,
        xlabel=X_LABELS[xc],
        ylabel="validation loss" if has_val else "training loss",
        budget=budget,
        budget_label=args.budget_label,
        logx=args.logx and xc != "step",
    )
    print(f"wrote {out} ({len(labels)} runs, x = {xc})")
    return 0
