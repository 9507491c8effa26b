"""Sparse Upcycling's vision recipe at small scale: a ViT pretrained from scratch on scikit-learn's digits,
then dense continued vs upcycled (expert choice C = 2, normalised, optimizer state carried over) vs
without normalisation vs with a fresh optimizer, at matched extra compute.

    upcycle vit-experiment recipes/vit-small.yaml --out results/vit-upcycling-small   (~12 min, 2 CPU cores)
    upcycle vit-experiment recipes/vit-small.yaml --tiny --out /tmp/vit-smoke          (smoke test, seconds)

Writes OUT/results.md, OUT/results.csv, OUT/results.json and OUT/accuracy_vs_flops.png (atomically).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from upcycle.cli.common import add_study_flags, study_out
from upcycle.errors import UpcycleError

HELP = "the paper's vision recipe at small scale: ViT on digits, dense vs upcycled (expert choice) vs FLOPs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_study_flags(p, "recipes/vit-small.yaml", resumes=False)
    p.add_argument("--threads", type=int, help="torch CPU threads (overrides the recipe's threads)")


def run(args: argparse.Namespace) -> int:
    from upcycle.experiments.vit import VitRecipe, run_vit_experiment

    recipe = VitRecipe.from_yaml(args.recipe, tiny=args.tiny)
    if args.threads is not None:
        if args.threads < 1:
            raise UpcycleError(f"--threads must be at least 1, got {args.threads}")
        recipe = dataclasses.replace(recipe, threads=args.threads)
    out, command = study_out(args, "vit-experiment")
    run_vit_experiment(recipe, out, progress=not args.quiet, log=lambda m: print(m, file=sys.stderr), command=command)
    print((out / "results.md").read_text())
    return 0
