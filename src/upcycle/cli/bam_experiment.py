"""`upcycle bam-experiment`: BAM vs BTX in miniature (see upcycle.experiments.bam)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from upcycle.experiments import bam as study
from upcycle.experiments.bam import BamExperiment
from upcycle.experiments.bam_recipe import BamRecipe

HELP = "BAM vs BTX in miniature: seed, domain specialists, mixtures at matched data and compute"
DESCRIPTION = study.__doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="experiment recipe (YAML; see recipes/bam-small.yaml)")
    p.add_argument("--out", type=Path, help="output directory (default: runs/<recipe name>[-tiny])")
    p.add_argument("--tiny", action="store_true", help="apply the recipe's `tiny:` overrides (a smoke test)")
    p.add_argument("--overwrite", action="store_true", help="delete OUT first instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:

    import torch

    recipe = BamRecipe.from_yaml(args.recipe, tiny=args.tiny)
    out = args.out or Path("runs") / (args.recipe.stem + ("-tiny" if args.tiny else ""))
    from upcycle.io.dirs import refuse_out_over_inputs, remove_for_overwrite

    refuse_out_over_inputs(out, [args.recipe])
    if args.overwrite and out.exists():
        remove_for_overwrite(out, [args.recipe])
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    command = f"upcycle bam-experiment {args.recipe}" + (" --tiny" if args.tiny else "") + f" --out {out}"
    threads = torch.get_num_threads()
    try:
        res = BamExperiment(recipe, out, not args.quiet, lambda m: print(m, file=sys.stderr), command).run()
    finally:
        torch.set_num_threads(threads)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.md, results.csv, bam.png ({res['info']['wall_s'] / 60:.1f} min)")
    return 0
