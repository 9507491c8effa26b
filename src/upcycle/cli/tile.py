"""upcycle tile: depth tiling, a deeper dense model warm-started by repeating the layers of a dense one.

    upcycle tile --model DIR --factor 2 --out runs/deep              (stack: [0..L-1, 0..L-1])
    upcycle tile --model DIR --num_layers 45 --mode interleave --out runs/deep45
    upcycle tile --plan tile.yaml --out runs/deep                     (method: depth_tiling, same keys)

Sparse Upcycling's "dense upcycling" baseline (Komatsuzaki et al., ICLR 2023): the same extra compute spent
on a deeper dense model instead of experts. The research notes give no layer order for it; `stack` (the whole
stack again on top, as progressive stacking / G_stack / SOLAR do) is the default and `interleave` repeats
each layer in place (`baselines.tile_order`). Not function preserving: the deeper model needs training.
The output is a plain Hugging Face directory of the source's own class (safetensors, `config.json` with a
`depth_tiling` entry naming each layer's source), which `from_pretrained`, `upcycle train` and
`upcycle sparse` read like any dense checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from upcycle.methods.tiling import DepthTilingPlan

HELP = "depth tiling: a deeper dense model made by repeating the layers of a dense one"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from upcycle.cli.common import DTYPES, add_dataclass_flags

    p.add_argument("--model", type=Path, help="dense HF model directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--plan", type=Path, help="YAML with method: depth_tiling and the fields below")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="output dtype (default: the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_dataclass_flags(p, DepthTilingPlan, "depth tiling (same names as the YAML keys; override --plan)")


def resolve(args: argparse.Namespace) -> DepthTilingPlan:
    from upcycle.errors import PlanError
    from upcycle.io import yamlio

    base = {}
    if args.plan is not None:
        d = yamlio.read_mapping(args.plan, "plan file", PlanError)
        if not isinstance(d, dict) or d.get("method") != "depth_tiling":
            raise PlanError(f"{args.plan}: expected a mapping with `method: depth_tiling`")
        base = {k: v for k, v in d.items() if k != "method"}
    over = {f.name: getattr(args, f.name) for f in dataclasses.fields(DepthTilingPlan) if hasattr(args, f.name)}
    if "num_layers" in over:
        base.pop("factor", None)
    if "factor" in over:
        base.pop("num_layers", None)
    return DepthTilingPlan.from_dict(
        {"method": "depth_tiling", **base, **over}, str(args.plan) if args.plan else "flags"
    )


def run(args: argparse.Namespace) -> int:

    import torch

    from upcycle.formats.load import load_dense
    from upcycle.formats.validate import open_weights, read_config
    from upcycle.hub import default_model_dir
    from upcycle.io.compat import make_portable
    from upcycle.io.dirs import atomic_dir, copy_side_files, refuse_existing
    from upcycle.methods.baselines import num_params
    from upcycle.methods.tiling import check_family, depth_tile

    t0 = time.time()
    plan = resolve(args)
    refuse_existing(args.out, args.overwrite)
    model_dir = args.model if args.model is not None else default_model_dir(log=lambda m: print(m, file=sys.stderr))
    config = read_config(model_dir)
    check_family(config, str(model_dir / "config.json"))
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    with open_weights(model_dir) as source:
        size_check(source, config, plan, args.out, None if dtype == "auto" else dtype)
    dense = load_dense(model_dir, dtype=dtype)
    deep = depth_tile(dense, num_layers=plan.num_layers, factor=plan.factor, mode=plan.mode)
    deep.config.depth_tiling["plan"] = plan.to_dict()
    with atomic_dir(args.out, args.overwrite, [model_dir]) as tmp:
        deep.save_pretrained(tmp)
        copy_side_files(model_dir, tmp, replace=False)
        make_portable(tmp)
    L, T = len(deep.config.depth_tiling["source_of_layer"]), deep.config.depth_tiling["source_layers"]
    print(
        f"tiled {model_dir.name}: {T} -> {L} layers ({plan.mode}); parameters {num_params(dense) / 1e6:.1f}M -> "
        f"{num_params(deep) / 1e6:.1f}M; wrote {args.out} in {time.time() - t0:.1f} s"
    )
    return 0


def size_check(source, config, plan: DepthTilingPlan, out: Path, dtype) -> None:
    """The tiled model's size from the source's headers, against free disk and memory, before anything
    is built (a huge --factor is refused at once)."""
    import re

    from upcycle.errors import UpcycleError
    from upcycle.io.dirs import _size, check_disk_space

    L = config.num_hidden_layers
    new_layers = plan.num_layers if plan.num_layers is not None else round(L * plan.factor)
    layer_bytes = other = 0
    for k, t in source.tensors.items():
        numel = 1
        for d in t.shape:
            numel *= d
        n = numel * (dtype.itemsize if dtype is not None else t.dtype.itemsize)
        if re.search(r"\blayers\.\d+\.", k):
            layer_bytes += n
        else:
            other += n
    total = other + layer_bytes * new_layers // max(L, 1)
    check_disk_space(out, total)
    avail = _available_memory()
    if avail is not None and total + other + layer_bytes > avail:
        raise UpcycleError(
            f"the tiled model ({new_layers} layers) needs about {_size(total)} of memory besides the source's "
            f"{_size(other + layer_bytes)}, and {_size(avail)} is available; choose a smaller --factor or --num_layers"
        )


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
