"""upcycle branch: N copies of a seed dense model, each continued on its own domain (BAM / BTX step 1).

    upcycle branch --seed runs/seed/model --domains code=corpus:python docs=corpus:man
        --out runs/branches --general-share 0.1 --steps 500 --lr 1e-3 --seq_len 128   (one line)

Each domain is a NAME=DATA pair: DATA is what `upcycle train --data` takes (a text file, a folder of text
files, a .jsonl file) or an offline corpus corpus:NAME[:MAX_CHARS] (python | man | pypi). Each copy
trains on its domain plus --general-share of general data (--general DATA; default: the union of the
domains) and validates on its domain. Writes OUT/NAME/ (an `upcycle train` run: metrics.csv,
summary.json, model/) for each domain and OUT/branches.json; then `upcycle bam --seed SEED --experts
OUT/NAME ...` mixes them. Training fields are `upcycle train`'s flags (or --config train.yaml).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from upcycle.cli.common import add_data_flags
from upcycle.errors import UpcycleError

HELP = "train N copies of a seed dense model, one per domain (BAM / BTX step 1)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from upcycle.cli.train import _add_config_flags

    _add_config_flags(p)
    p.conflict_handler = p._optionals.conflict_handler = "resolve"  # --seed: the seed model; training: --train-seed
    p.add_argument("--seed", type=Path, required=True, help="seed dense model directory (transformers, safetensors)")
    p.add_argument(
        "--train-seed",
        "--train_seed",
        type=int,
        dest="cfg_seed",
        default=argparse.SUPPRESS,
        help="the training field `seed` (data order, split, RNGs; default 0)",
    )
    p.add_argument(
        "--domains",
        nargs="+",
        required=True,
        metavar="NAME=DATA",
        help="one per branch: name=path or name=corpus:python|man|pypi[:MAX_CHARS]",
    )
    p.add_argument("--out", type=Path, required=True, help="directory of the branch runs")
    p.add_argument("--general", help="general data mixed into every branch (default: the union of the domains)")
    p.add_argument(
        "--general-share",
        "--general_share",
        type=float,
        default=0.1,
        help="share of each branch's training sequences from the general data (default 0.1, as BAM)",
    )
    p.add_argument("--config", type=Path, help="training config YAML (keys = the training fields below)")
    add_data_flags(p, "--seed")
    p.add_argument("--overwrite", action="store_true", help="retrain branches that finished before")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:

    from upcycle.cli.train import resolve_config
    from upcycle.hub import cache_root
    from upcycle.train.branch import branch, branch_data, log_stderr, parse_domain

    args.resume = False
    config = resolve_config(args)
    if not args.seed.is_dir():
        raise UpcycleError(f"seed model directory not found: {args.seed}")
    domains = [parse_domain(s) for s in args.domains]
    names = [n for n, _ in domains]
    if len(set(names)) != len(names):
        raise UpcycleError(f"--domains: each name once, got {', '.join(names)}")
    from upcycle.formats.validate import load_tokenizer, read_config

    tokenizer = load_tokenizer(args.tokenizer or args.seed, vocab_size=read_config(args.seed).vocab_size)
    data = branch_data(
        domains,
        tokenizer,
        config.seq_len,
        args.general,
        args.general_share,
        args.val_fraction,
        config.seed,
        cache_root() / "tokens",
        args.text_field,
        args.chunk_chars,
    )
    out = branch(
        args.seed,
        data,
        config,
        args.out,
        tokenizer=tokenizer,
        progress=not args.quiet,
        overwrite=args.overwrite,
        log=log_stderr,
    )
    print("branches: " + " ".join(str(v) for v in out.values()))
    print(f"mix them: upcycle bam --seed {args.seed} --experts {' '.join(str(v) for v in out.values())} --out DIR")
    return 0
