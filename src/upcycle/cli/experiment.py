"""Sparse Upcycling's central comparison at small scale: dense continued vs upcycled vs depth tiled vs
an MoE from scratch, at equal extra compute.

    upcycle experiment recipes/paper-small.yaml --out runs/upcycling-small      (~25 min on 2 CPU cores)
    upcycle experiment recipes/paper-small.yaml --tiny --out /tmp/smoke         (the CI smoke test size)
    upcycle experiment recipes/smollm2.yaml --out runs/smollm2-continued        (SmolLM2-135M, two arms)
    upcycle experiment recipes/paper-gpu.yaml --out runs/upcycling-gpu          (the larger run, for a GPU)
    upcycle experiment recipes/upcycling-regime.yaml --out runs/upcycling-regime (the regime study, ~5 h;
                                                                                 see upcycle.experiments.regime)

Runs the dense pretraining (budget B), then one continued run per arm to the largest extra budget,
evaluated at every budget (see `upcycle.experiment`). Writes OUT/results.csv, OUT/results.md,
OUT/loss_vs_flops.png, OUT/results.json and each run's metrics.csv. Running it again on the same OUT
skips the runs that finished; --overwrite starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from upcycle.cli.common import add_study_flags, study_out
from upcycle.errors import UpcycleError

HELP = (
    "a study from a recipe: the paper's comparison at small scale (dense / upcycled / depth-tiled / MoE from "
    "scratch vs FLOPs), or with `study: regime` when upcycling pays (recipes/upcycling-regime.yaml)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_study_flags(p, "recipes/")
    p.add_argument("--threads", type=int, help="torch CPU threads (overrides the recipe's threads)")
    p.add_argument("--workers", type=int, help="regime study: runs side by side (overrides the recipe's workers)")
    p.add_argument(
        "--publish",
        type=Path,
        metavar="DIR",
        help="regime study: write OUT's report and the state to resume it from (DIR/state) into DIR, train nothing",
    )


def _with_flags(recipe, args: argparse.Namespace, flags: tuple[str, ...]):
    """The recipe with the command line's --threads (and --workers) over it."""
    for flag in flags:
        v = getattr(args, flag)
        if v is not None:
            if v < 1:
                raise UpcycleError(f"--{flag} must be at least 1, got {v}")
            recipe = dataclasses.replace(recipe, **{flag: v})
    return recipe


def run(args: argparse.Namespace) -> int:
    from upcycle.experiments.regime_recipe import is_regime_recipe, load_recipe_mapping

    if is_regime_recipe(load_recipe_mapping(args.recipe)):
        return _run_regime(args)
    if args.publish or args.workers is not None:
        raise UpcycleError("--publish and --workers belong to the regime study (a recipe with study: regime)")
    from upcycle.experiments.recipe import Recipe
    from upcycle.experiments.sparse import run_experiment

    recipe = _with_flags(Recipe.from_yaml(args.recipe, tiny=args.tiny), args, ("threads",))
    out, command = study_out(args, "experiment")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    res = run_experiment(recipe, out, progress=not args.quiet, log=lambda m: print(m, file=sys.stderr), command=command)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.md, results.csv, loss_vs_flops.png ({res['info']['wall_s'] / 60:.1f} min)")
    return 0


def _run_regime(args: argparse.Namespace) -> int:
    from upcycle.experiments.regime import publish, run_study
    from upcycle.experiments.regime_recipe import RegimeRecipe, load_recipe_mapping

    recipe = RegimeRecipe.from_dict(load_recipe_mapping(args.recipe), source=str(args.recipe), tiny=args.tiny)
    recipe = _with_flags(recipe, args, ("threads", "workers"))
    if args.publish and args.overwrite:
        raise UpcycleError("--publish reads the study in --out; it does not go with --overwrite")
    out, command = study_out(args, "experiment")
    if args.publish:
        if not (out / "recipe.json").is_file():
            raise UpcycleError(f"--publish: {out} holds no regime study (no recipe.json); give the study's --out")
        res = publish(recipe, out, args.publish, command=command)
        print(
            f"wrote {args.publish}/results.md, results.json, results.csv, {', '.join(res['figures'])} and state/ "
            f"({len(res['missing_runs'])} runs not finished)"
        )
        return 0
    res = run_study(
        recipe,
        out,
        log=lambda m: print(m, file=sys.stderr, flush=True),
        command=command,
        progress=not args.quiet and recipe.workers == 1,
    )
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.md, results.json, results.csv, {', '.join(res['figures'])}")
    return 0
