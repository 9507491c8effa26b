"""What every study shares: the machine record, a BPE tokenizer trained on the corpus, the small dense
Llama config, budgets in steps, and reading a run's metrics back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from fractions import Fraction
from pathlib import Path

from upcycle.errors import UpcycleError
from upcycle.experiments.recipe import Recipe, decoder_shape


def keep_recipe(out: Path, recipe, free: tuple[str, ...], what: str = "an experiment") -> None:
    """Record `recipe` in OUT/recipe.json. A recipe recorded there before must be the same but for the keys in
    `free` (what a resumed run may change: arms added, workers, ...); a key added to the recipe's class since
    stands at its default in the old one. Otherwise OUT's finished runs would be mixed with other settings."""
    saved = Path(out) / "recipe.json"
    new = json.loads(json.dumps(recipe.to_dict()))  # as JSON reads it back: lists, not tuples
    if saved.is_file():
        fields = dataclasses.fields(type(recipe))
        defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
        old = json.loads(json.dumps(defaults)) | json.loads(saved.read_text())
        diff = sorted(k for k in set(old) | set(new) if k not in free and old.get(k) != new.get(k))
        if diff:
            raise UpcycleError(
                f"{out} holds {what} with a different recipe ({', '.join(diff)}); pass --overwrite or another --out"
            )
    saved.write_text(json.dumps(new, indent=1) + "\n")


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cpu",
        "threads": torch.get_num_threads(),
    }
    try:
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def train_bpe(docs, vocab_size: int, out_dir: Path):
    """A byte-level BPE tokenizer trained on `docs` (the training split), saved to out_dir; reused when there."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (out_dir / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(out_dir)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator((d.text for d in docs), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    hf.save_pretrained(out_dir)
    return hf


def dense_config(recipe: Recipe, vocab_size: int, eos: int):
    """The studies' dense Llama."""
    from transformers import LlamaConfig

    return LlamaConfig(**decoder_shape(recipe.model, recipe.seq_len, vocab_size, eos), rms_norm_eps=1e-5)


def budget_steps(
    shares: list[float], budget_flops: float, fpt: int, tokens_per_step: int
) -> tuple[int, dict[float, int]]:
    """(evaluation interval for the curve, {share of B: step}) for an arm: each budget's step is the one
    whose cumulative FLOPs are closest to share x B; the curve is evaluated about every largest common
    unit of the shares (e.g. every 10% of B for 10/20/40%)."""
    fr = [Fraction(f).limit_denominator(1000) for f in shares]
    den = math.lcm(*[x.denominator for x in fr])
    unit = Fraction(math.gcd(*[x.numerator * (den // x.denominator) for x in fr]), den)
    every = max(1, round(float(unit) * budget_flops / (fpt * tokens_per_step)))
    return every, {f: max(1, round(f * budget_flops / (fpt * tokens_per_step))) for f in shares}


def split_seen(data, recipe: Recipe, pretrain_steps: int):
    """The training sequences the dense pretraining did not read (for the continued arms)."""
    import torch

    from upcycle.data.tokens import Batches, PackedData

    if not pretrain_steps:
        return data
    n = data.train.shape[0]
    consumed = pretrain_steps * recipe.batch_size
    if consumed >= n:
        raise UpcycleError(
            f"the pretraining reads {consumed} sequences but the corpus has {n}: raise max_chars or "
            "lower pretrain_tokens, so the continued runs see new text"
        )
    b = Batches(data.train, recipe.batch_size, recipe.seed)
    seen = set(b.indices(0, consumed))
    rest = [i for i in b.permutation(0).tolist() if i not in seen]
    need = max(recipe.extra) * pretrain_steps * recipe.batch_size
    if len(rest) < need:
        print(
            f"note: the continued arms read {need:.0f} sequences but only {len(rest)} are unseen; they repeat "
            "some (raise max_chars)"
        )
    return PackedData(data.train[torch.tensor(rest)], data.val, dict(data.info, continuation_sequences=len(rest)))


def cumulative_time(rows: list[dict]) -> dict[int, float]:
    out, t = {}, 0.0
    tps = None
    for r in rows:
        if r.get("tokens_per_s"):
            # tokens per step is constant inside a run
            tps = tps or (r["tokens"] / r["step"])
            t += tps / r["tokens_per_s"]
        out[int(r["step"])] = t
    return out


def read_rows(path: Path) -> list[dict]:
    from upcycle.eval.plots import read_metrics

    cols = read_metrics(path)
    n = len(cols["step"])
    return [{k: cols[k][i] for k in cols} for i in range(n)]
