"""upcycle export: write an upcycled model as a stock transformers MoE checkpoint.

    upcycle export runs/smollm2-moe --to qwen2_moe --out runs/smollm2-qwen2moe
    upcycle export runs/all-moe --to mixtral --layout fused --out runs/mixtral

The result loads with `AutoModelForCausalLM.from_pretrained` and no code of ours. A target that cannot
represent the model exactly is refused with every reason; `--explain` lists, for every target, whether it
fits and, where it does, whether it is exact in each engine (transformers 5 and 4.57, vLLM, llama.cpp,
lm-eval) and why not.
Any stock Mixtral / Qwen2-MoE / Qwen3-MoE directory is also accepted as input (it is imported first).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = "write an upcycled model as a stock Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from upcycle.cli.common import add_shared_expert_size
    from upcycle.formats.targets import LAYOUTS, TARGETS

    p.add_argument("model", type=Path, help="upcycled model directory (native format)")
    p.add_argument("--to", choices=sorted(TARGETS), help="stock target class")
    p.add_argument("--out", type=Path, help="output directory (must not exist unless --overwrite)")
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="legacy",
        help="expert tensors one per expert (legacy, read by every engine; default) or fused 3-D "
        "(transformers 5's gate_up_proj)",
    )
    add_shared_expert_size(p)
    p.add_argument("--max_shard_size", "--max-shard-size", default="5GB", help="largest shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--explain", action="store_true", help="print, for every target, whether it fits and why not")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from upcycle.errors import UpcycleError
    from upcycle.formats.native import read_meta
    from upcycle.formats.stock import export, read_native
    from upcycle.formats.stock_import import is_stock_moe
    from upcycle.formats.targets import TARGETS

    if args.explain:
        if is_stock_moe(args.model):
            raise UpcycleError(f"{args.model} is already a stock MoE checkpoint; --explain reads native models")
        from upcycle.formats.engines import explain_lines

        config, plan, moe_layers, structure = read_native(args.model)
        print("\n".join(explain_lines(config, plan, moe_layers, structure, args.layout)))
        return 0
    if args.to is None or args.out is None:
        raise UpcycleError("export needs --to TARGET and --out DIR (or --explain)")
    if args.to == "qwen2_moe":
        from upcycle.formats.stock import null_shared_width

        null_shared_width(args.shared_expert_size)  # refuses a width below 1 before any work
    t0 = time.time()
    source = args.model
    if is_stock_moe(source):
        from upcycle.formats.load import load

        source = load(source)
    elif not (Path(args.model) / "upcycle.json").is_file():
        read_meta(args.model)  # raises the standard "not an upcycled model" error
    export(
        source,
        args.to,
        args.out,
        layout=args.layout,
        shared_expert_size=args.shared_expert_size,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
        source_dir=args.model,
    )
    print(
        f"wrote {args.out} ({TARGETS[args.to].architecture}, {args.layout} expert layout) in "
        f"{time.time() - t0:.1f} s; load it with transformers' AutoModelForCausalLM.from_pretrained"
    )
    return 0
