"""The `upcycle` command.

    upcycle sparse [--model DIR] [--plan plan.yaml] [--<plan field> VALUE ...] --out DIR
    upcycle check DIR --against DENSE_DIR [--text FILE]
    upcycle plan [--plan plan.yaml] [--<plan field> VALUE ...]      print the resolved plan as YAML

Plan fields are flags of the same name as their YAML keys (`--num_experts 8`; `--num-experts` works
too); flags override the plan file. Any bad input ends with a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time
import types
import typing
from pathlib import Path

from upcycle.errors import UpcycleError
from upcycle.methods.plan import UpcyclePlan

DTYPES = ("auto", "float32", "bfloat16", "float16")

# Commands that live in their own modules: each has HELP, add_arguments(parser) and run(args) -> int,
# and imports anything heavy inside run().
EXTRA_COMMANDS: dict[str, str] = {
    "bam": "upcycle.bam_cli",
    "bam-experiment": "upcycle.bam_experiment",
    "branch": "upcycle.branch_cli",
    "btx": "upcycle.btx_cli",
    "export": "upcycle.export_cli",
    "eval": "upcycle.eval_cli",
    "experiment": "upcycle.experiment_cli",
    "plot": "upcycle.plot_cli",
    "train": "upcycle.train_cli",
    "tile": "upcycle.tile_cli",
    "vit-experiment": "upcycle.vit_experiment_cli",
}


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("true", "yes", "1", "on"):
        return True
    if v in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def add_dataclass_flags(
    p: argparse.ArgumentParser,
    cls: type,
    title: str,
    dest_prefix: str = "",
    types_: dict[str, typing.Callable] | None = None,
) -> None:
    """One flag per field of the dataclass `cls`, named like its YAML key (`--num_experts` and
    `--num-experts`), typed from its annotation (`types_` overrides), absent from the namespace unless given."""
    g = p.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if f.name in (types_ or {}):
            kind = types_[f.name]
        elif bool in args:
            kind = _bool
        elif int in args and float not in args:
            kind = int
        elif float in args:
            kind = float
        else:
            kind = str
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        g.add_argument(
            *names,
            dest=dest_prefix + f.name,
            type=kind,
            default=argparse.SUPPRESS,
            metavar=f.name.upper(),
            choices=f.metadata.get("choices"),
            help=f.metadata.get("help", "")
            + ("" if "default:" in f.metadata.get("help", "") else f" (default: {f.default})"),
        )


def _add_plan_flags(p: argparse.ArgumentParser) -> None:
    add_dataclass_flags(
        p, UpcyclePlan, "plan fields (same names as the YAML keys; override --plan)", types_={"layers": str}
    )


def build_parser() -> argparse.ArgumentParser:
    from upcycle._version import __version__

    p = argparse.ArgumentParser(prog="upcycle", description="Turn dense Transformer checkpoints into MoE models.")
    p.add_argument("--version", action="version", version=f"upcycle {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "sparse",
        help="sparse upcycling of a dense checkpoint",
        description="Sparse upcycling: chosen MLPs become MoE layers of copied experts.",
    )
    s.add_argument("--model", type=Path, help="dense HF model directory (default: embedded SmolLM2-135M-Instruct)")
    s.add_argument("--plan", type=Path, help="plan YAML file")
    s.add_argument("--out", type=Path, required=True, help="output directory (must not exist unless --overwrite)")
    s.add_argument("--dtype", choices=DTYPES, default="auto", help="output dtype (default: the source's)")
    s.add_argument("--max_shard_size", "--max-shard-size", default="5GB", help="largest shard (default 5GB)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument(
        "--stream",
        type=_bool,
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
    _add_plan_flags(s)

    c = sub.add_parser("check", help="function-preservation figures of an upcycled model against its dense source")
    c.add_argument("model", type=Path, help="upcycled model directory")
    c.add_argument("--against", type=Path, required=True, help="dense model directory it came from")
    c.add_argument("--text", type=Path, help="text file to evaluate on (default: Python's textwrap.py source)")
    c.add_argument("--tokens", type=int, default=1024, help="tokens of the text to use (default 1024)")
    c.add_argument("--context", type=int, default=512, help="window length for logits and perplexity")
    c.add_argument("--max_rel", "--max-rel", type=float, help="exit 1 if the relative logit difference exceeds this")

    pl = sub.add_parser("plan", help="print the resolved plan as YAML")
    pl.add_argument("--plan", type=Path, help="plan YAML file")
    _add_plan_flags(pl)

    for name, module in EXTRA_COMMANDS.items():
        mod = importlib.import_module(module)
        sp = sub.add_parser(
            name, help=mod.HELP, description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        mod.add_arguments(sp)
    return p


def resolve_plan(args: argparse.Namespace) -> UpcyclePlan:
    """The plan file (if any) with the flags over it."""
    path = getattr(args, "plan", None)
    base = UpcyclePlan.from_yaml(path) if path else UpcyclePlan()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(UpcyclePlan) if hasattr(args, f.name)}
    if not overrides:
        return base
    try:
        return dataclasses.replace(base, **overrides)
    except UpcycleError as e:
        raise UpcycleError(f"--{e}") from None


def family_plan(plan: UpcyclePlan, config, adapter) -> UpcyclePlan:
    """The plan with the paper's routing for this family where the user named no router (surgery.applied_plan),
    saying so on stderr for encoders and ViT, whose default (expert choice) differs from the decoders' top-k."""
    from upcycle.methods.surgery import applied_plan

    out = applied_plan(plan, config)
    if plan.router is None and out.router == "expert_choice":
        print(
            f"note: {adapter.family}: expert-choice routing (C = {out.capacity:g}, normalised), the paper's recipe "
            "for encoders and vision; --router topk for token choice",
            file=sys.stderr,
        )
    return out


def load_dense_config(model_dir: Path):
    from transformers import AutoConfig

    if not model_dir.exists():
        raise UpcycleError(f"model directory not found: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise UpcycleError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # transformers raises several types for unreadable configs
        raise UpcycleError(f"{model_dir / 'config.json'}: cannot read it ({str(e).splitlines()[0]})") from None


def _num_params(model) -> int:
    from upcycle.methods.baselines import num_params

    return num_params(model)


def _count(model) -> tuple[int, int]:
    """(total parameters, parameters active per token)."""
    from upcycle.moe.block import moe_blocks

    total = _num_params(model)
    active = total
    for _, b in moe_blocks(model):
        per_expert = sum(p.numel() for p in b.experts.parameters()) // b.num_experts
        active -= int(per_expert * (b.num_experts - b.router_config.experts_per_token(b.num_experts)))
    return total, active


def cmd_sparse(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from upcycle.adapters import adapter_for
    from upcycle.default_model import default_model_dir
    from upcycle.formats.native import save
    from upcycle.io.dirs import sha256_files
    from upcycle.io.models import model_class
    from upcycle.io.safetensors import weight_files
    from upcycle.methods.layers import select_layers
    from upcycle.methods.surgery import upcycle

    t0 = time.time()
    plan = resolve_plan(args)
    if args.out.exists() and not args.overwrite:
        raise UpcycleError(f"output directory already exists: {args.out} (choose another --out or pass --overwrite)")
    model_dir = args.model if args.model is not None else default_model_dir(log=lambda m: print(m, file=sys.stderr))
    config = load_dense_config(model_dir)
    adapter = adapter_for(config, source=str(model_dir / "config.json"))
    plan = family_plan(plan, config, adapter)
    layers = select_layers(plan.layers, adapter.dims(config)[0])
    files = weight_files(model_dir)
    if not files:
        raise UpcycleError(
            f"{model_dir}: no safetensors weights (model.safetensors or {model_dir}/"
            "model.safetensors.index.json); convert the checkpoint to safetensors first"
        )

    if args.format != "native":
        from upcycle.formats.stock import check_exportable
        from upcycle.methods.streaming import upcycled_structure

        check_exportable(args.format, config, plan, layers, upcycled_structure(plan, config))  # before any work
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.stream and plan.router_init == "data":
        print("note: router_init=data runs the dense model on the prompts: converting in memory", file=sys.stderr)
        args.stream = False
    if args.stream and adapter.causal and not adapter.stack:  # encoders, ViT, T5: small, upcycled in memory
        _sparse_streaming(args, plan, model_dir, config, layers, dtype, t0)
        return 0
    dense = model_class(config).from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    dense_total = _num_params(dense)
    with tqdm(total=len(layers), desc="upcycling layers", disable=args.quiet) as bar:
        tok = None
        if plan.router_init == "data":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model_dir)
        model = upcycle(dense, plan, inplace=True, progress=bar, tokenizer=tok)
    if args.format != "native":
        from upcycle.formats.stock import export

        export(
            model,
            args.format,
            args.out,
            layout=args.layout,
            plan=plan,
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
    _report(args, plan, model_dir, config, dense_total, *_count(model), t0)
    return 0


def _sparse_streaming(
    args: argparse.Namespace, plan: UpcyclePlan, model_dir: Path, config, layers: list[int], dtype, t0: float
) -> None:
    """`upcycle sparse` for safetensors sources: tensor by tensor, never the whole model in memory."""
    from upcycle.formats.native import stream_upcycle
    from upcycle.io.models import meta_model
    from upcycle.methods.surgery import convert_structure

    transform = write_config = None
    if args.format != "native":
        from upcycle.formats.stock import stock_config, stock_items
        from upcycle.methods.streaming import upcycled_structure

        cfg = {k: v for k, v in config.to_dict().items() if k != "upcycle"}
        st = upcycled_structure(plan, config)
        transform = lambda items: stock_items(
            items,
            args.format,
            cfg,
            layers,
            layout=args.layout,  # noqa: E731
            structure=st,
        )
        write_config = lambda c, d: stock_config(  # noqa: E731
            args.format, cfg | {"dtype": str(c.dtype).removeprefix("torch.")}, plan, layers, structure=st
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
    )
    model = meta_model(config)  # parameter counts from shapes alone
    dense_total = _num_params(model)
    convert_structure(model, plan)
    _report(args, plan, model_dir, config, dense_total, *_count(model), t0)


def _report(
    args, plan: UpcyclePlan, model_dir: Path, config, dense_total: int, total: int, active: int, t0: float
) -> None:
    from upcycle.adapters import adapter_for
    from upcycle.methods.layers import select_layers

    num_layers = adapter_for(config).dims(config)[0]
    print(
        f"upcycled {model_dir.name}: {len(select_layers(plan.layers, num_layers))}/{num_layers} layers -> MoE "
        f"({plan.num_experts} experts, router {plan.router}"
        + (f", top_k {plan.top_k}" if plan.router == "topk" else "")
        + ")"
    )
    print(
        f"parameters: {dense_total / 1e6:.1f}M dense -> {total / 1e6:.1f}M total, {active / 1e6:.1f}M active "
        f"per token; wrote {args.out} in {time.time() - t0:.1f} s"
    )


def cmd_check(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.evaluate import compare, format_table, held_out_text
    from upcycle.formats.load import load
    from upcycle.formats.native import read_meta
    from upcycle.formats.stock_import import is_stock_moe

    if not is_stock_moe(args.model):  # stock Mixtral / Qwen2-MoE / Qwen3-MoE directories are imported
        read_meta(args.model)
    from upcycle.encoders import cmd_check as encoder_check
    from upcycle.encoders import is_causal_lm

    if not is_causal_lm(load_dense_config(args.against)):  # encoders, ViT, T5: outputs, not perplexity
        return encoder_check(args)
    if args.text is not None:
        if not args.text.is_file():
            raise UpcycleError(f"text file not found: {args.text}")
        text, text_name = args.text.read_text(errors="replace"), str(args.text)
    else:
        text, text_name = held_out_text()
    if args.tokens < 2 or args.context < 2:
        raise UpcycleError("--tokens and --context must be at least 2")
    tok_dir = args.model if (args.model / "tokenizer_config.json").is_file() else args.against
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = tok(text, return_tensors="pt").input_ids[0, : args.tokens]
    moe = load(args.model, dtype=torch.float32)
    dense = AutoModelForCausalLM.from_pretrained(args.against, dtype=torch.float32, use_safetensors=True).eval()
    r = compare(moe, dense, ids, args.context)
    rows = [
        ("text", f"{text_name}, {r.tokens} tokens, windows of {args.context}"),
        ("max |logit diff|", f"{r.max_abs:.3e}"),
        ("max |logit diff| / max |logit|", f"{r.max_rel:.3e}"),
        ("top-1 agreement", f"{100 * r.top1_agreement:.2f}%"),
        ("perplexity (dense)", f"{r.ppl_dense:.4f}"),
        ("perplexity (upcycled)", f"{r.ppl_moe:.4f}"),
    ]
    print(format_table(rows, f"function preservation: {args.model} vs {args.against} (fp32)"))
    if args.max_rel is not None and r.max_rel > args.max_rel:
        print(f"relative difference {r.max_rel:.3e} exceeds --max_rel {args.max_rel:g}", file=sys.stderr)
        return 1
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    text = resolve_plan(args).to_yaml()
    # no router named: say what null means (the model decides, so the plan alone cannot)
    text = text.replace(
        "\nrouter: null\n", "\nrouter: null  # the family's: expert_choice in encoders and ViT, topk in decoders\n"
    )
    print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in EXTRA_COMMANDS:
            return importlib.import_module(EXTRA_COMMANDS[args.command]).run(args)
        return {"sparse": cmd_sparse, "check": cmd_check, "plan": cmd_plan}[args.command](args)
    except UpcycleError as e:
        print(f"upcycle: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("upcycle: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
