"""upcycle btx: mix a seed and its branches into one MoE the BTX way (Branch-Train-MiX, arXiv 2403.07816).

    upcycle btx --seed runs/seed/model --experts runs/branches/code runs/branches/docs --out runs/btx

FFN expert i = model i's MLP behind a new router (top-2, renormalised; load balancing alpha = 0.01);
attention, embeddings, norms and LM head are the mean of the N models (the seed is the general expert).
The baseline `upcycle bam` is compared with.
"""

from __future__ import annotations

import argparse

from upcycle.cli import bam as bam_cli

HELP = "mix a seed and its branches into one MoE the BTX way (averaged attention, top-2 FFN experts)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    bam_cli.add_arguments(p, "btx")


def run(args: argparse.Namespace) -> int:
    return bam_cli.run(args, "btx")
