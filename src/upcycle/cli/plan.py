"""`upcycle plan`: print the resolved plan as YAML."""

from __future__ import annotations

import argparse
from pathlib import Path

from upcycle.cli.common import add_plan_flags, resolve_plan

HELP = "print the resolved plan as YAML"


def add_arguments(pl: argparse.ArgumentParser) -> None:
    pl.add_argument("--plan", type=Path, help="plan YAML file")
    add_plan_flags(pl)


def cmd_plan(args: argparse.Namespace) -> int:
    text = resolve_plan(args).to_yaml()
    # no router named: say what null means (the model decides, so the plan alone cannot)
    text = text.replace(
        "\nrouter: null\n", "\nrouter: null  # the family's: expert_choice in encoders and ViT, topk in decoders\n"
    )
    print(text, end="")
    return 0


run = cmd_plan
