"""`upcycle check`: function-preservation figures of an upcycled model against its dense source,
for causal LMs here and for encoders, ViT and T5 in `encoder_check`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from upcycle.cli.common import load_dense_config
from upcycle.errors import UpcycleError
from upcycle.eval.encoders import compare_outputs
from upcycle.formats.load import load_any

HELP = "function-preservation figures of an upcycled model against its dense source"


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("model", type=Path, help="upcycled model directory")
    c.add_argument("--against", type=Path, required=True, help="dense model directory it came from")
    c.add_argument("--text", type=Path, help="text file to evaluate on (default: Python's textwrap.py source)")
    c.add_argument("--tokens", type=int, default=1024, help="tokens of the text to use (default 1024)")
    c.add_argument("--context", type=int, default=512, help="window length for logits and perplexity")
    c.add_argument("--max_rel", "--max-rel", type=float, help="exit 1 if the relative logit difference exceeds this")


def cmd_check(args: argparse.Namespace) -> int:
    import torch

    from upcycle.eval.perplexity import compare, format_table, held_out_text
    from upcycle.formats.load import load
    from upcycle.formats.native import read_meta
    from upcycle.formats.stock_import import is_stock_moe
    from upcycle.formats.validate import load_tokenizer, read_config

    if args.max_rel is not None and not 0 < args.max_rel < float("inf"):
        raise UpcycleError(f"--max-rel must be a positive number, got {args.max_rel}")
    if not is_stock_moe(args.model):  # stock Mixtral / Qwen2-MoE / Qwen3-MoE directories are imported
        read_meta(args.model)
    from upcycle.cli.check import encoder_check
    from upcycle.eval.encoders import is_causal_lm

    dense_config, moe_config = load_dense_config(args.against), read_config(args.model)
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        a, b = getattr(moe_config, key, None), getattr(dense_config, key, None)
        if a != b:  # not its source: the figures would compare unrelated models
            raise UpcycleError(
                f"{args.model} ({key} {a}) cannot have come from {args.against} ({key} {b}): "
                "give --against the dense model it was upcycled from"
            )
    if not is_causal_lm(dense_config):  # encoders, ViT, T5: outputs, not perplexity
        return encoder_check(args)
    if args.text is not None:
        from upcycle.data.documents import read_text_file

        text, text_name = read_text_file(args.text), str(args.text)
    else:
        text, text_name = held_out_text()
    if args.tokens < 2 or args.context < 2:
        raise UpcycleError("--tokens and --context must be at least 2")
    tok = load_tokenizer(args.model, args.against, vocab_size=moe_config.vocab_size)
    ids = tok(text, return_tensors="pt").input_ids[0, : args.tokens]
    if ids.numel() < 2:
        raise UpcycleError(f"{text_name}: {ids.numel()} token(s); check needs at least 2: give a longer --text")
    warn_if_not_the_source(args.model, args.against)
    moe = load(args.model, dtype=torch.float32)
    dense = load_any(args.against)
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


def encoder_check(args) -> int:
    """`upcycle check` for encoders, ViT and T5 (cli.cmd_check hands over here)."""
    from upcycle.eval.perplexity import format_table, held_out_text
    from upcycle.formats.load import load
    from upcycle.formats.validate import load_tokenizer, read_config

    config = read_config(args.against)
    tok = text = None
    text_name = "random images"
    if config.model_type != "vit":
        if args.text is not None:
            from upcycle.data.documents import read_text_file

            text, text_name = read_text_file(args.text), str(args.text)
        else:
            text, text_name = held_out_text()
        tok = load_tokenizer(args.model, args.against)
        if tok.pad_token is None:  # sentences are padded to a batch; the attention mask hides the padding
            tok.pad_token = tok.eos_token or tok.unk_token
    moe = load(args.model, dtype=torch.float32)
    dense = load_any(args.against)  # the one front door; a dense directory loads through its own class
    max_length = min(args.context, 512, getattr(config, "max_position_embeddings", None) or 512)
    r = compare_outputs(
        moe,
        dense,
        config,
        tok,
        text,
        n=32,
        max_length=max_length,
        max_tokens=None if config.model_type == "vit" else args.tokens,
    )
    rows = [
        ("inputs", f"{text_name}: {r.inputs}"),
        ("compared", r.what),
        ("max |diff| / max |dense|", f"{r.max_rel:.3e}"),
    ]
    if r.mean_cos is not None:
        rows += [("cosine (mean, min)", f"{r.mean_cos:.6f}, {r.min_cos:.6f}")]
    if r.top1_agreement is not None:
        rows += [("top-1 agreement", f"{100 * r.top1_agreement:.2f}%")]
    print(format_table(rows, f"function preservation: {args.model} vs {args.against} (fp32)"))
    if args.max_rel is not None and r.max_rel > args.max_rel:
        print(f"relative difference {r.max_rel:.3e} exceeds --max_rel {args.max_rel:g}", file=sys.stderr)
        return 1
    return 0


run = cmd_check


def warn_if_not_the_source(model: Path, against: Path) -> None:
    """Warn when --against's weights are not the bytes the conversion recorded as its source."""
    import warnings

    from upcycle.errors import UpcycleWarning
    from upcycle.formats.native import read_meta
    from upcycle.io.dirs import sha256_files
    from upcycle.io.safetensors import weight_files

    if not (Path(model) / "upcycle.json").is_file():
        return
    source = read_meta(model).get("source") or {}
    recorded = source.get("weights") or {}
    if not recorded:
        return
    if sha256_files(weight_files(Path(against))) != recorded:
        warnings.warn(
            f"{against}: its weights' sha256 differ from the source recorded in {model}/upcycle.json "
            f"({source.get('path')}); the figures compare against another model than the one converted",
            UpcycleWarning,
            stacklevel=2,
        )
