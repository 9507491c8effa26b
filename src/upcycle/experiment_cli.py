"""Sparse Upcycling's central comparison at small scale: dense continued vs upcycled vs depth tiled vs
an MoE from scratch, at equal extra compute.

    upcycle experiment recipes/paper-small.yaml --out runs/upcycling-small      (~25 min on 2 CPU cores)
    upcycle experiment recipes/paper-small.yaml --tiny --out /tmp/smoke         (the CI smoke test size)
    upcycle experiment recipes/smollm2.yaml --out runs/smollm2-continued        (SmolLM2-135M, two arms)
    upcycle experiment recipes/paper-gpu.yaml --out runs/upcycling-gpu          (the larger run, for a GPU)
    upcycle experiment recipes/upcycling-regime.yaml --out runs/upcycling-regime (the regime study, ~5 h;
                                                                                 see upcycle.regime)

Runs the dense pretraining (budget B), then one continued run per arm to the largest extra budget,
evaluated at every budget (see `upcycle.experiment`). Writes OUT/results.csv, OUT/results.md,
OUT/loss_vs_flops.png, OUT/results.json and each run's metrics.csv. Running it again on the same OUT
skips the runs that finished; --overwrite starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

from .errors import UpcycleError

HELP = "the paper's core comparison at small scale: dense / upcycled / depth-tiled / MoE-from-scratch vs FLOPs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="experiment recipe (YAML; see recipes/)")
    p.add_argument("--out", type=Path, help="output directory (default: runs/<recipe name>[-tiny])")
    p.add_argument("--tiny", action="store_true", help="apply the recipe's `tiny:` overrides (a smoke test)")
    p.add_argument("--overwrite", action="store_true", help="delete OUT first instead of resuming")
    p.add_argument("--threads", type=int, help="torch CPU threads (overrides the recipe's threads)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--workers", type=int, help="regime study: runs side by side (overrides the recipe's workers)")


def run(args: argparse.Namespace) -> int:
    from .regime import is_regime_recipe, load_recipe_mapping

    if is_regime_recipe(load_recipe_mapping(args.recipe)):
        return _run_regime(args)
    from .experiment import Recipe, run_experiment

    recipe = Recipe.from_yaml(args.recipe, tiny=args.tiny)
    if args.threads is not None:
        if args.threads < 1:
            raise UpcycleError(f"--threads must be at least 1, got {args.threads}")
        recipe = dataclasses.replace(recipe, threads=args.threads)
    out = args.out or Path("runs") / (args.recipe.stem + ("-tiny" if args.tiny else ""))
    if out.exists() and not out.is_dir():
        raise UpcycleError(f"--out {out} is a file")
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    command = f"upcycle experiment {args.recipe}" + (" --tiny" if args.tiny else "") + f" --out {out}"
    res = run_experiment(recipe, out, progress=not args.quiet, log=lambda m: print(m, file=sys.stderr),
                         command=command)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.md, results.csv, loss_vs_flops.png ({res['info']['wall_s'] / 60:.1f} min)")
    return 0


def _run_regime(args: argparse.Namespace) -> int:
    from .regime import RegimeRecipe, load_recipe_mapping, run_study

    recipe = RegimeRecipe.from_dict(load_recipe_mapping(args.recipe), source=str(args.recipe), tiny=args.tiny)
    if args.threads is not None:
        if args.threads < 1:
            raise UpcycleError(f"--threads must be at least 1, got {args.threads}")
        recipe = dataclasses.replace(recipe, threads=args.threads)
    if args.workers is not None:
        if args.workers < 1:
            raise UpcycleError(f"--workers must be at least 1, got {args.workers}")
        recipe = dataclasses.replace(recipe, workers=args.workers)
    out = args.out or Path("runs") / (args.recipe.stem + ("-tiny" if args.tiny else ""))
    if out.exists() and not out.is_dir():
        raise UpcycleError(f"--out {out} is a file")
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    command = f"upcycle experiment {args.recipe}" + (" --tiny" if args.tiny else "") + f" --out {out}"
    res = run_study(recipe, out, log=lambda m: print(m, file=sys.stderr, flush=True), command=command,
                    progress=not args.quiet and recipe.workers == 1)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.md, results.json, results.csv, {', '.join(res['figures'])}")
    return 0
