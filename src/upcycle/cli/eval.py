"""Evaluate a model directory: perplexity on held-out text and, for an upcycled model, the expert load of
every MoE layer (tokens per expert, dropped tokens, router entropy).

    upcycle eval DIR [--text FILE ...] [--tokens N] [--context N] [--out OUT_DIR]

DIR is a native upcycled directory (it has upcycle.json), a stock Mixtral / Qwen2-MoE / Qwen3-MoE / FlexOlmo
directory (imported), or a plain dense Hugging Face directory with
safetensors weights. The text is cut into disjoint windows of --context tokens, each scored on every token
but its first, and routed as one sequence (the protocol of `upcycle check`). With --out, eval.json and,
for an MoE model, expert-load.png (layers x experts heatmap) are written there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from upcycle.cli.common import check_device
from upcycle.errors import UpcycleError

OUT_REPLACES = False  # --out is a folder eval.json is written into, never replaced
HELP = "perplexity and per-layer expert load of a model directory, with a heatmap"
DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="upcycled (native) or dense Hugging Face model directory")
    p.add_argument(
        "--text",
        type=Path,
        action="append",
        help="text file to evaluate on; repeat for several (default: Python's textwrap.py source)",
    )
    p.add_argument("--tokens", type=int, default=2048, help="tokens of each text to use (default 2048)")
    p.add_argument(
        "--context", type=int, help="window length in tokens (default 512, or the model's positions if fewer)"
    )
    p.add_argument("--tokenizer", type=Path, help="directory with the tokenizer (default: the model directory)")
    p.add_argument("--out", type=Path, help="directory to write eval.json and expert-load.png into")
    p.add_argument("--title", help="title of the heatmap (default: 'Expert load: <model directory name>')")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default float32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _texts(files: list[Path] | None) -> list[tuple[str, str]]:
    from upcycle.eval.perplexity import held_out_text

    if not files:
        text, name = held_out_text()
        return [(name, text)]
    from upcycle.data.documents import read_text_file

    return [(str(f), read_text_file(f)) for f in files]


def _write_atomic(path: Path, data: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(data)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    import torch

    from upcycle.eval.perplexity import ExpertLoad, markdown_table, perplexity_and_load
    from upcycle.formats.load import load_any
    from upcycle.formats.validate import load_tokenizer, read_config

    t0 = time.time()
    check_device(args.device)
    if args.tokens < 2 or (args.context is not None and args.context < 2):
        raise UpcycleError("--tokens and --context must be at least 2")
    texts = _texts(args.text)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UpcycleError(f"--out {args.out} exists and is not a directory")
    model_config = read_config(args.model)
    max_pos = getattr(model_config, "max_position_embeddings", None)
    if args.context is None:  # the default: 512 tokens, within what the model was trained on
        args.context = min(512, max_pos or 512)
    elif max_pos and args.context > max_pos:
        import warnings

        from upcycle.errors import UpcycleWarning

        warnings.warn(
            f"--context {args.context} is above the model's max_position_embeddings {max_pos}: positions past it "
            "were never trained, so the perplexity says little",
            UpcycleWarning,
            stacklevel=1,
        )
    vocab = getattr(model_config, "vocab_size", None)
    tok = load_tokenizer(args.tokenizer or args.model, vocab_size=vocab)
    dtype = getattr(torch, args.dtype)
    model = load_any(args.model, dtype=dtype, device=args.device)
    from upcycle.eval.encoders import is_causal_lm

    if not is_causal_lm(model.config):
        raise UpcycleError(
            f"{args.model}: a {type(model).__name__} has no next-token perplexity; upcycle eval is for "
            "causal language models. For encoders, ViT and T5 use `upcycle check DIR --against "
            "DENSE_DIR` (outputs and embeddings vs the dense model)"
        )

    results, loads = [], []
    for name, text in texts:
        ids = tok(text, return_tensors="pt").input_ids[0, : args.tokens]
        if ids.numel() < 2:
            raise UpcycleError(f"{name}: fewer than 2 tokens of text")
        ppl, load = perplexity_and_load(model, ids, args.context)
        results.append(
            {
                "text": name,
                "tokens": int(ids.numel()),
                "perplexity": ppl,
                "expert_load": load.to_dict() if load is not None else None,
            }
        )
        if load is not None:
            loads.append(load)
    total = ExpertLoad.total(loads) if loads else None

    print(f"## upcycle eval: {args.model} ({args.dtype}, windows of {args.context} tokens)\n")
    print(
        markdown_table(
            ["text", "tokens", "perplexity"], [[r["text"], str(r["tokens"]), f"{r['perplexity']:.4f}"] for r in results]
        )
    )
    if total is None:
        print("\nno MoE layers: a dense model (perplexity only)")
    else:
        routers = ", ".join(sorted(set(total.routers)))
        print(
            f"\nexpert load: {len(total.layers)} MoE layers x {total.num_experts} experts, router {routers}; "
            f"{total.tokens} tokens; tokens/expert counts token-expert assignments\n"
        )
        print(total.table())
    png = None
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        if total is not None:
            from upcycle.eval.plots import plot_load

            png = plot_load(total, args.out / "expert-load.png", title=args.title or f"Expert load: {args.model.name}")
        summary = {
            "model": str(args.model),
            "dtype": args.dtype,
            "context": args.context,
            "texts": results,
            "expert_load": total.to_dict() if total is not None else None,
            "seconds": round(time.time() - t0, 2),
        }
        _write_atomic(args.out / "eval.json", json.dumps(summary, indent=2) + "\n")
        print(f"\nwrote {args.out / 'eval.json'}" + (f" and {png}" if png else ""), file=sys.stderr)
    return 0
