"""Continue training a dense or upcycled model on your text.

    upcycle train --model DIR --data PATH --out DIR [--config train.yaml] [--<field> VALUE ...]
    upcycle train --model DIR --data PATH --out DIR --resume     continue the newest checkpoint exactly
                                                 (training fields default to the run's own)
    torchrun --nproc_per_node N -m upcycle train ... --parallel ddp|fsdp

--model is an upcycled model (from `upcycle sparse`) or a dense transformers directory (default: the
embedded SmolLM2-135M-Instruct). --data is a text file, a folder of text files or a .jsonl file;
documents are split into train and validation by a hash of their id, then packed into sequences of
--seq_len tokens. Training fields are flags of the same name as their YAML keys and override --config.
--dense-optimizer-state starts an upcycled model from a dense run's AdamW state (a checkpoint of
`upcycle train` on the dense model): experts get copies of the MLP's moments, routers start at zero.
Writes OUT/metrics.csv, OUT/tb/ (TensorBoard), OUT/checkpoints/step-N/, OUT/summary.json, OUT/model/.

For an upcycled model, what won in the regime study (results/upcycling-regime/results.md): the dense run's
stable LR after a short re-warm (--warmup about 1% of the steps), a decay at the end (--schedule wsd), and a
fresh optimizer state (carrying the dense AdamW state changed nothing beyond the seed spread).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from upcycle.cli.common import add_data_flags
from upcycle.errors import UpcycleError

HELP = "continue training a dense or upcycled model (checkpoints, resume, DDP/FSDP)"


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    from upcycle.cli.common import add_dataclass_flags
    from upcycle.train.config import TrainConfig

    add_dataclass_flags(
        p,
        TrainConfig,
        "training fields (same names as the YAML keys; override --config)",
        dest_prefix="cfg_",
        types_={"tokens": lambda s: int(float(s))},
    )  # accept 1e6


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="upcycled or dense model directory (default: embedded SmolLM2-135M)")
    p.add_argument("--data", type=Path, required=True, help="text file, folder of text files, or .jsonl file")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--config", type=Path, help="training config YAML (keys = the training fields below)")
    p.add_argument("--resume", action="store_true", help="continue the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="delete an existing --out and start over")
    add_data_flags(p, "--model")
    p.add_argument(
        "--dense-optimizer-state",
        "--dense_optimizer_state",
        type=Path,
        help="dense run's checkpoint directory (or its optimizer.pt) to carry the AdamW state over from",
    )
    p.add_argument("--stop-at", "--stop_at", type=int, help="stop after this step with a checkpoint (resume later)")
    p.add_argument(
        "--accept-changes",
        "--accept_changes",
        action="store_true",
        help="--resume with settings other than the run's (refused otherwise; the old train_config.yaml is kept)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(p)


def resolve_config(args: argparse.Namespace):
    from upcycle.train.config import TrainConfig

    if args.config:
        base = TrainConfig.from_yaml(args.config)
    elif args.resume and (args.out / "train_config.yaml").is_file():
        base = TrainConfig.from_yaml(args.out / "train_config.yaml")  # the run's own settings
    else:
        base = TrainConfig()
    overrides = {
        f.name: getattr(args, f"cfg_{f.name}")
        for f in dataclasses.fields(TrainConfig)
        if hasattr(args, f"cfg_{f.name}")
    }
    try:
        return dataclasses.replace(base, **overrides) if overrides else base
    except UpcycleError as e:
        raise UpcycleError(f"--{e}") from None


def _dense_state(path: Path) -> dict:
    import torch

    f = path / "optimizer.pt" if path.is_dir() else path
    if not f.is_file():
        raise UpcycleError(
            f"dense optimizer state not found: {f} (give a checkpoints/step-N directory of a "
            "dense `upcycle train` run, or its optimizer.pt)"
        )
    try:
        return torch.load(f, weights_only=True, map_location="cpu")
    except Exception as e:  # pickle errors of several kinds
        raise UpcycleError(f"{f}: not a readable optimizer state ({str(e).splitlines()[0]})") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from upcycle.data.tokens import load_data
    from upcycle.formats.load import load_any
    from upcycle.formats.validate import load_tokenizer, read_config
    from upcycle.hub import cache_root, default_model_dir
    from upcycle.train.checkpoint import refuse_mixed_runs
    from upcycle.train.flops import model_on_meta
    from upcycle.train.loop import train
    from upcycle.train.optim import carry_over_optimizer_state

    if args.stop_at is not None and args.stop_at < 1:
        raise UpcycleError(f"--stop-at must be at least 1 (the step after which the run stops), got {args.stop_at}")

    config = resolve_config(args)
    if not args.data.exists():
        raise UpcycleError(f"data path not found: {args.data}")
    if not 0 <= args.val_fraction < 1:
        raise UpcycleError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    out = args.out
    refuse_mixed_runs(out, args.resume, args.overwrite)  # before the model and data are loaded
    dense_state = _dense_state(args.dense_optimizer_state) if args.dense_optimizer_state else None
    model_dir = args.model if args.model is not None else default_model_dir(log=lambda m: print(m, file=sys.stderr))
    if not model_dir.is_dir():
        raise UpcycleError(f"model directory not found: {model_dir}")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model_config = read_config(model_dir)
    from upcycle.eval.encoders import is_causal_lm
    from upcycle.formats.stock_import import is_stock_moe

    # before anything is written: the loop trains next-token prediction (stock MoE decoders are imported)
    if not is_stock_moe(model_dir) and not is_causal_lm(model_config):
        raise UpcycleError(
            f"{model_dir}: `upcycle train` continues decoder LMs with next-token prediction; "
            f"{model_config.model_type} is not one (encoders and ViT: train them with your own task loop)"
        )
    vocab = model_config.vocab_size
    tokenizer = load_tokenizer(args.tokenizer or model_dir, vocab_size=vocab)
    data = load_data(
        args.data,
        tokenizer,
        config.seq_len,
        args.val_fraction,
        config.seed,
        args.text_field,
        args.chunk_chars,
        cache_dir=cache_root() / "tokens",
    )
    model = load_any(model_dir, dtype=torch.float32)
    init_state = None
    if dense_state is not None and not args.resume:
        if not getattr(model.config, "upcycle", None):
            raise UpcycleError(
                "--dense-optimizer-state needs an upcycled --model (the state is carried from the "
                "dense model it came from)"
            )
        dense = model_on_meta(model.config)
        init_state = carry_over_optimizer_state(dense_state, dense, model)
    print(
        f"data: {data.info['train_documents']} train / {data.info['val_documents']} validation documents, "
        f"{data.info['train_sequences']} x {config.seq_len} train tokens",
        file=sys.stderr,
    )
    history = train(
        model,
        data,
        config,
        out,
        resume=args.resume,
        accept_changes=args.accept_changes,
        overwrite=args.overwrite,
        init_optimizer_state=init_state,
        tokenizer=tokenizer,
        source_dir=model_dir,
        progress=not args.quiet,
        stop_at=args.stop_at,
    )
    import json
    import os

    summary_file = out / "summary.json"
    if os.environ.get("RANK", "0") != "0":
        return 0
    if summary_file.is_file():
        s = json.loads(summary_file.read_text())
        share = f", {100 * s['compute_share']:.4g}% of the dense pretraining compute" if s["compute_share"] else ""
        val = f"{s['final_val_loss']:.4f}" if s["final_val_loss"] is not None else "n/a"
        print(
            f"trained {s['steps']} steps, {s['tokens']:,} tokens, {s['flops']:.3g} FLOPs{share}; "
            f"final train loss {s['final_train_loss']:.4f}, validation loss {val}; model in {out / 'model'}"
        )
    elif history:
        print(f"stopped at step {history[-1]['step']}; continue with --resume")
    return 0
