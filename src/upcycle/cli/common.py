"""What the command modules share: dataclass fields as flags (YAML key = flag = field), the plan
resolved from a file and flags, the dense source's config, parameter counts, the studies' flags and OUT.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

from upcycle.errors import UpcycleError
from upcycle.methods.plan import UpcyclePlan

DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_bool(s: str) -> bool:
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
            kind = parse_bool
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


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    add_dataclass_flags(
        p, UpcyclePlan, "plan fields (same names as the YAML keys; override --plan)", types_={"layers": str}
    )


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
    from upcycle.formats.validate import read_config

    return read_config(model_dir)


def _num_params(model) -> int:
    from upcycle.methods.baselines import num_params

    return num_params(model)


def _count(model) -> tuple[int, int]:
    """(total parameters, parameters active per token: the embedding counted, as model cards count them)."""
    from upcycle.train.flops import active_params

    return _num_params(model), active_params(model, embedding=True)


def add_shared_expert_size(p: argparse.ArgumentParser) -> None:
    """--shared-expert-size, for `export` and `sparse --format`."""
    from upcycle.formats.targets import NULL_SHARED_EXPERT_WIDTH  # light: no torch at parser time

    p.add_argument(
        "--shared_expert_size",
        "--shared-expert-size",
        type=int,
        default=None,
        metavar="N",
        help="qwen2_moe only, for a model without a shared expert: width of the null shared expert written "
        f"in its place (zero weights, output exactly 0; default {NULL_SHARED_EXPERT_WIDTH}, at least 1)",
    )


def add_data_flags(p: argparse.ArgumentParser, model_flag: str) -> None:
    """How a training command reads its text: the tokenizer (default: the model's, named by `model_flag`), the
    validation share, the JSONL field and the chunking of plain text files."""
    p.add_argument("--tokenizer", type=Path, help=f"tokenizer directory (default: {model_flag}'s)")
    p.add_argument(
        "--val-fraction",
        "--val_fraction",
        type=float,
        default=0.05,
        help="share of documents held out for validation (default 0.05)",
    )
    p.add_argument("--text-field", "--text_field", default="text", help="JSONL field with the text (default text)")
    p.add_argument(
        "--chunk-chars",
        "--chunk_chars",
        type=int,
        default=8192,
        help="text files are cut at blank lines into documents of about this many characters",
    )


def add_study_flags(p: argparse.ArgumentParser, example: str, resumes: bool = True) -> None:
    """The flags every study command takes: RECIPE, --out, --tiny, --quiet, and --overwrite where OUT is filled
    in place and resumed (a study written at once, atomically, simply replaces OUT)."""
    p.add_argument("recipe", type=Path, help=f"experiment recipe (YAML; see {example})")
    p.add_argument("--out", type=Path, help="output directory (default: runs/<recipe name>[-tiny])")
    p.add_argument("--tiny", action="store_true", help="apply the recipe's `tiny:` overrides (a smoke test)")
    if resumes:
        p.add_argument("--overwrite", action="store_true", help="delete OUT first instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def study_out(args: argparse.Namespace, command: str) -> tuple[Path, str]:
    """A study's OUT (default runs/<recipe name>[-tiny]) and the command line recorded with its results.
    OUT may not be a file, the recipe, or hold it, default or not; --overwrite empties it first."""
    from upcycle.io.dirs import refuse_out_over_inputs, remove_for_overwrite

    out = args.out or Path("runs") / (args.recipe.stem + ("-tiny" if args.tiny else ""))
    if out.exists() and not out.is_dir():
        raise UpcycleError(f"--out {out} is a file")
    refuse_out_over_inputs(out, [args.recipe])
    if getattr(args, "overwrite", False) and out.exists():
        remove_for_overwrite(out, [args.recipe])
    return out, f"upcycle {command} {args.recipe}" + (" --tiny" if args.tiny else "") + f" --out {out}"


def check_device(name: str) -> str:
    """A --device that torch can use here, or one error line saying why not."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise UpcycleError(
            f"--device {name!r}: not a torch device ({str(e).splitlines()[0]}); e.g. cpu or cuda:0"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UpcycleError(f"--device {name}: this torch has no CUDA device (torch {torch.__version__}); use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UpcycleError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return name
