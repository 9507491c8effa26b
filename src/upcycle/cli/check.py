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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.eval.perplexity import compare, format_table, held_out_text
    from upcycle.formats.load import load
    from upcycle.formats.native import read_meta
    from upcycle.formats.stock_import import is_stock_moe

    if not is_stock_moe(args.model):  # stock Mixtral / Qwen2-MoE / Qwen3-MoE directories are imported
        read_meta(args.model)
    from upcycle.cli.check import encoder_check
    from upcycle.eval.encoders import is_causal_lm

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
    if ids.numel() < 2:
        raise UpcycleError(f"{text_name}: {ids.numel()} token(s); check needs at least 2: give a longer --text")
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


def encoder_check(args) -> int:
    """`upcycle check` for encoders, ViT and T5 (cli.cmd_check hands over here)."""
    from transformers import AutoConfig, AutoTokenizer

    from upcycle.eval.perplexity import format_table, held_out_text
    from upcycle.formats.load import load

    config = AutoConfig.from_pretrained(args.against)
    tok = text = None
    text_name = "random images"
    if config.model_type != "vit":
        if args.text is not None:
            if not args.text.is_file():
                raise UpcycleError(f"text file not found: {args.text}")
            text, text_name = args.text.read_text(errors="replace"), str(args.text)
        else:
            text, text_name = held_out_text()
        tok_dir = args.model if (args.model / "tokenizer_config.json").is_file() else args.against
        tok = AutoTokenizer.from_pretrained(tok_dir)
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
