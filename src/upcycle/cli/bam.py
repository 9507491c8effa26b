"""upcycle bam: mix a seed and its branches into one MoE with attention experts (BAM, arXiv 2408.08274).

    upcycle bam --seed runs/seed/model --experts runs/branches/code runs/branches/docs --out runs/bam
    upcycle bam ... --kv shared          one K/V projection (the models' mean); Wq, Wo per expert
    upcycle bam ... --top-k 2 --normalize

The seed is the general expert: N = 1 + the number of --experts (each a dense model directory, or an
`upcycle branch` run directory holding model/). FFN expert i = model i's MLP behind a new router
(top-1, softmax over all experts, not renormalised); attention expert i = model i's attention, mixed
per token by a soft router; everything else is the mean of the N models. A parallel-attention seed
(Cohere) gives BAM's parallel block; a sequential one (Llama, SmolLM2) keeps its block (said in the log).
Writes the native format (`upcycle train` and `upcycle eval` read it; `upcycle.load` rebuilds it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from upcycle.errors import UpcycleError

HELP = "mix a seed and its branches into one MoE with attention experts (BAM)"
METHOD = "bam"


def add_arguments(p: argparse.ArgumentParser, method: str = METHOD) -> None:
    p.add_argument("--seed", type=Path, required=True, help="seed dense model directory (the general expert)")
    p.add_argument(
        "--experts",
        type=Path,
        nargs="+",
        required=True,
        help="branched dense models (directories, or `upcycle branch` run directories)",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist unless --overwrite)")
    if method == "bam":
        p.add_argument(
            "--kv",
            choices=("experts", "shared"),
            default="experts",
            help="attention experts keep their own K/V (experts, default) or share the mean (shared)",
        )
    p.add_argument(
        "--top-k", "--top_k", type=int, help=f"FFN experts per token (default {1 if method == 'bam' else 2})"
    )
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"renormalise the top-k FFN weights (default {'no' if method == 'bam' else 'yes'})",
    )
    p.add_argument("--aux-loss-coef", "--aux_loss_coef", type=float, help="FFN load-balancing alpha (default 0.01)")
    p.add_argument(
        "--z-loss-coef",
        "--z_loss_coef",
        type=float,
        help=f"FFN router z-loss beta (default {0.001 if method == 'bam' else 0})",
    )
    p.add_argument("--router-std", "--router_std", type=float, help="std of the new routers (default 0.02)")
    p.add_argument("--router-seed", "--router_seed", type=int, help="seed of the router initialisation (default 0)")
    p.add_argument("--max_shard_size", "--max-shard-size", default="5GB", help="largest shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def model_dir(path: Path) -> Path:
    """A dense model directory, or the model/ of an `upcycle train` / `upcycle branch` run directory."""
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    raise UpcycleError(f"{path}: no config.json (give a dense model directory or an `upcycle branch` run directory)")


def run(args: argparse.Namespace, method: str = METHOD) -> int:
    from upcycle.formats.load import load_dense
    from upcycle.formats.native import save
    from upcycle.methods.bam import BamPlan, check_compatible, mix, tokenizer_hash

    t0 = time.time()
    dirs = [model_dir(args.seed)] + [model_dir(p) for p in args.experts]
    if len(set(d.resolve() for d in dirs)) != len(dirs):
        raise UpcycleError("the seed and the --experts must be different models")
    plan = BamPlan.for_method(
        method,
        len(dirs),
        kv=getattr(args, "kv", None),
        top_k=args.top_k,
        normalize=args.normalize,
        aux_loss_coef=args.aux_loss_coef,
        z_loss_coef=args.z_loss_coef,
        router_std=args.router_std,
        seed=args.router_seed,
    )
    models = [load_dense(d) for d in dirs]
    names = [str(d) for d in dirs]
    check_compatible(
        [m.config for m in models], [m.state_dict() for m in models], names, [tokenizer_hash(d) for d in dirs]
    )
    model = mix(models, plan, names, log=lambda m: print(m, file=sys.stderr))
    save(model, plan, args.out, source_dir=dirs[0], max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    what = f"attention experts (kv {plan.kv}), " if plan.method == "bam" else "averaged attention, "
    print(
        f"wrote {args.out}: {plan.method.upper()} of {len(dirs)} models, {what}FFN top-{plan.top_k} "
        f"{'renormalised' if plan.normalize else 'not renormalised'}, in {time.time() - t0:.1f} s"
    )
    return 0
