"""`upcycle sparse`: streaming or in memory, native or a stock format."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from upcycle.cli.common import (
    DTYPES,
    _count,
    _num_params,
    add_plan_flags,
    add_shared_expert_size,
    family_plan,
    load_dense_config,
    parse_bool,
    resolve_plan,
)
from upcycle.errors import UpcycleError
from upcycle.methods.plan import UpcyclePlan

HELP = "sparse upcycling of a dense checkpoint"
DESCRIPTION = (
    "Sparse upcycling: chosen MLPs become MoE layers of copied experts. The decoder defaults (8 copied experts, "
    "top-2 renormalised, every other layer) are what the regime study found best: no variant (unnormalised, "
    "top-1, granular, Drop-Upcycling) beat them beyond the seed spread (results/upcycling-regime/results.md)."
)


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", type=Path, help="dense HF model directory (default: embedded SmolLM2-135M-Instruct)")
    s.add_argument("--plan", type=Path, help="plan YAML file")
    s.add_argument("--out", type=Path, required=True, help="output directory (must not exist unless --overwrite)")
    s.add_argument("--dtype", choices=DTYPES, default="auto", help="output dtype (default: the source's)")
    s.add_argument("--max_shard_size", "--max-shard-size", default="5GB", help="largest shard (default 5GB)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument(
        "--stream",
        type=parse_bool,
        default=True,
        metavar="BOOL",
        help="convert tensor by tensor without loading the model (default true; false: load the model "
        "with transformers, upcycle it in memory, then save)",
    )
    s.add_argument(
        "--format",
        choices=("native", "mixtral", "qwen2_moe", "qwen3_moe", "flex_olmo"),
        default="native",
        help="native (upcycle.load reads it) or a stock transformers MoE class, written directly "
        "(refused with the reasons when that class cannot represent the plan exactly)",
    )
    s.add_argument(
        "--layout",
        choices=("legacy", "fused"),
        default="legacy",
        help="stock formats: expert tensors one per expert (default) or fused 3-D",
    )
    add_shared_expert_size(s)
    add_plan_flags(s)


def cmd_sparse(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from upcycle.adapters import adapter_for
    from upcycle.formats.native import save
    from upcycle.formats.validate import load_pretrained, load_tokenizer
    from upcycle.hub import default_model_dir
    from upcycle.io.dirs import refuse_existing, sha256_files
    from upcycle.io.safetensors import weight_files
    from upcycle.methods.layers import select_layers
    from upcycle.methods.surgery import upcycle

    t0 = time.time()
    plan = resolve_plan(args)
    refuse_existing(args.out, args.overwrite)
    model_dir = args.model if args.model is not None else default_model_dir(log=lambda m: print(m, file=sys.stderr))
    config = load_dense_config(model_dir)
    if getattr(config, "upcycle", None):  # its MLPs are MoE blocks already: a missing-tensor error would follow
        raise UpcycleError(f"{model_dir} is upcycled already (config.json has an upcycle record); give the dense model")
    adapter = adapter_for(config, source=str(model_dir / "config.json"))
    plan = family_plan(plan, config, adapter)
    layers = select_layers(plan.layers, adapter.dims(config)[0])
    files = weight_files(model_dir)
    if not files:
        raise UpcycleError(
            f"{model_dir}: no safetensors weights (model.safetensors or {model_dir}/"
            "model.safetensors.index.json); convert the checkpoint to safetensors first"
        )

    structure = None
    if args.format != "native":
        from upcycle.formats.targets import check_exportable
        from upcycle.methods.streaming import upcycled_structure

        structure = upcycled_structure(plan, config)  # computed once: the check and the stock writer use it
        check_exportable(args.format, config, plan, layers, structure)  # before any work
        if args.format == "qwen2_moe":
            from upcycle.formats.stock import null_shared_width

            null_shared_width(args.shared_expert_size)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.stream and plan.router_init == "data":
        print("note: router_init=data runs the dense model on the prompts: converting in memory", file=sys.stderr)
        args.stream = False
    if args.stream and adapter.causal and not adapter.stack:  # encoders, ViT, T5: small, upcycled in memory
        _sparse_streaming(args, plan, model_dir, config, layers, structure, dtype, t0)
        return 0
    dense = load_pretrained(model_dir, dtype=dtype, config=config)
    dense_total = _num_params(dense)
    with tqdm(total=len(layers), desc="upcycling layers", disable=args.quiet) as bar:
        tok = None
        if plan.router_init == "data":
            tok = load_tokenizer(model_dir, vocab_size=config.vocab_size, flag="a tokenizer in --model")
        model = upcycle(dense, plan, inplace=True, progress=bar, tokenizer=tok)
    if args.format != "native":
        from upcycle.formats.stock import export

        export(
            model,
            args.format,
            args.out,
            layout=args.layout,
            plan=plan,
            shared_expert_size=args.shared_expert_size,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            progress=not args.quiet,
            source_dir=model_dir,
        )
    else:
        save(
            model,
            plan,
            args.out,
            source_dir=model_dir,
            source_hashes=sha256_files(files),
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    _report(args, plan, model_dir, config, layers, dense_total, *_count(model), t0)
    return 0


def _sparse_streaming(
    args: argparse.Namespace,
    plan: UpcyclePlan,
    model_dir: Path,
    config,
    layers: list[int],
    structure: dict | None,
    dtype,
    t0: float,
) -> None:
    """`upcycle sparse` for safetensors sources: tensor by tensor, never the whole model in memory."""
    from upcycle.formats.native import stream_upcycle
    from upcycle.io.models import meta_model
    from upcycle.methods.surgery import convert_structure

    transform = write_config = None
    if args.format != "native":
        from upcycle.formats.stock import stock_config, stock_items

        cfg = {k: v for k, v in config.to_dict().items() if k != "upcycle"}
        st = structure
        size = args.shared_expert_size
        transform = lambda items: stock_items(  # noqa: E731
            items, args.format, cfg, layers, layout=args.layout, structure=st, shared_expert_size=size
        )
        write_config = lambda c, d: stock_config(  # noqa: E731
            args.format,
            cfg | {"dtype": str(c.dtype).removeprefix("torch.")},
            plan,
            layers,
            structure=st,
            shared_expert_size=size,
        ).save_pretrained(d)
    stream_upcycle(
        model_dir,
        plan,
        args.out,
        dtype=None if dtype == "auto" else dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
        transform=transform,
        write_config=write_config,
        config=config,  # read once, by cmd_sparse
    )
    model = meta_model(config)  # parameter counts from shapes alone
    dense_total = _num_params(model)
    convert_structure(model, plan, layers)
    _report(args, plan, model_dir, config, layers, dense_total, *_count(model), t0)


def _report(
    args,
    plan: UpcyclePlan,
    model_dir: Path,
    config,
    layers: list[int],
    dense_total: int,
    total: int,
    active: int,
    t0: float,
) -> None:
    from upcycle.adapters import adapter_for

    num_layers = adapter_for(config).dims(config)[0]
    print(
        f"upcycled {model_dir.name}: {len(layers)}/{num_layers} layers -> MoE "
        f"({plan.num_experts} experts, router {plan.router}"
        + (f", top_k {plan.top_k}" if plan.router == "topk" else "")
        + ")"
    )
    print(
        f"parameters: {dense_total / 1e6:.1f}M dense -> {total / 1e6:.1f}M total, {active / 1e6:.1f}M active "
        f"per token; wrote {args.out} in {time.time() - t0:.1f} s"
    )


run = cmd_sparse
