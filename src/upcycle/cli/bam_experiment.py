"""`upcycle bam-experiment`: BAM vs BTX in miniature (see upcycle.experiments.bam)."""

from __future__ import annotations

import argparse
import sys

from upcycle.cli.common import add_study_flags, study_out
from upcycle.experiments import bam as study
from upcycle.experiments.bam import BamExperiment
from upcycle.experiments.bam_recipe import BamRecipe

HELP = "BAM vs BTX in miniature: seed, domain specialists, mixtures at matched data and compute"
DESCRIPTION = study.__doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_study_flags(p, "recipes/bam-small.yaml")


def run(args: argparse.Namespace) -> int:

    import torch

    recipe = BamRecipe.from_yaml(args.recipe, tiny=args.tiny)
    out, command = study_out(args, "bam-experiment")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    threads = torch.get_num_threads()
    try:
        res = BamExperiment(recipe, out, not args.quiet, lambda m: print(m, file=sys.stderr), command).run()
    finally:
        torch.set_num_threads(threads)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.md, results.csv, bam.png ({res['info']['wall_s'] / 60:.1f} min)")
    return 0
