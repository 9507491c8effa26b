"""The BAM vs BTX study's recipe, its Cohere-style dense config, data sampling and the latency probe."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upcycle.errors import UpcycleError
from upcycle.io import yamlio
from upcycle.io.yamlio import option

MIXES = ("btx", "bam", "bam_shared")


LABELS = {"btx": "BTX", "bam": "BAM, KV experts", "bam_shared": "BAM, KV shared"}


@dataclass(frozen=True)
class BamRecipe:
    name: str = option("bam", "name shown in the results")
    seed: int = option(0, "seed of the split, data order, model and router initialisations")
    domains: dict = option(None, "{name: data spec}: corpus:python|man|pypi[:MAX_CHARS] or a path")
    max_chars: int | None = option(3_000_000, "characters per corpus domain (a seeded sample of documents)")
    val_fraction: float = option(0.1, "share of each domain's documents held out")
    seq_len: int = option(128, "tokens per sequence")
    batch_size: int = option(16, "sequences per step")
    vocab_size: int = option(4096, "byte-level BPE vocabulary trained on the training documents")
    model: dict = option(None, "{hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads}")
    pretrain_steps: int = option(800, "seed pretraining steps")
    pretrain_lr: float = option(2e-3, "seed peak LR (warmup, cosine to 10%)")
    warmup: int = option(20, "warmup steps of the seed, branches and mixtures")
    branch_steps: int = option(300, "steps per specialist")
    branch_lr: float = option(1e-3, "specialists' peak LR (cosine to 10%; BAM: half the pretraining's)")
    general_share: float = option(0.1, "share of general (union) data in each specialist's training")
    mix_steps: int = option(300, "mixture training steps (the data-matched budget)")
    mix_lr: float = option(1e-3, "mixtures' LR, constant after warmup")
    mixes: tuple = option(MIXES, "which mixtures")
    eval_batches: int = option(8, "evaluation sequences per domain = eval_batches x batch_size")
    eval_every: int = option(50, "mixtures' validation (equal-mix) every N steps")
    latency_prompt: int = option(32, "prompt tokens of the generation latency")
    latency_new_tokens: int = option(64, "greedy tokens generated for the latency")
    latency_repeats: int = option(3, "timed repeats (median)")
    threads: int = option(1, "torch CPU threads")
    tiny: dict | None = option(None, "overrides applied by --tiny")

    def __post_init__(self) -> None:
        object.__setattr__(self, "mixes", tuple(self.mixes))
        if not self.domains or not isinstance(self.domains, dict) or len(self.domains) < 1:
            raise UpcycleError(f"recipe {self.name!r}: domains: give at least one {{name: data spec}}")
        unknown = [m for m in self.mixes if m not in MIXES]
        if unknown or not self.mixes:
            raise UpcycleError(f"recipe {self.name!r}: mixes: choose from {', '.join(MIXES)}")
        need = {"hidden_size", "intermediate_size", "num_layers", "num_heads"}
        if not isinstance(self.model, dict) or need - set(self.model):
            raise UpcycleError(f"recipe {self.name!r}: model: give {sorted(need)} (and num_kv_heads)")
        for k in ("pretrain_steps", "branch_steps", "mix_steps", "batch_size", "seq_len"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise UpcycleError(f"recipe {self.name!r}: {k} must be a positive integer")

    @classmethod
    def from_yaml(cls, path: str | Path, tiny: bool = False) -> "BamRecipe":
        return yamlio.recipe_from_dict(cls, yamlio.read_mapping(path, "recipe"), str(path), tiny)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mixes"] = list(self.mixes)
        return d


def cohere_config(r: BamRecipe, vocab_size: int, eos: int):
    """The parallel-attention seed: transformers' Cohere block (one LayerNorm, attention and SwiGLU MLP
    side by side), GQA, RoPE, tied embeddings; logit_scale 1 (Cohere's 0.0625 is for its large models)."""
    from transformers import CohereConfig

    from upcycle.experiments.recipe import decoder_shape

    return CohereConfig(**decoder_shape(r.model, r.seq_len, vocab_size, eos), logit_scale=1.0, pad_token_id=eos)


def _sample(seqs, n: int, seed: int):
    """n sequences of seqs in a seeded order (the whole set repeated when n is larger)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(seqs.shape[0], generator=g)
    if n > idx.numel():
        idx = idx.repeat(math.ceil(n / idx.numel()))
    return seqs[idx[:n]]


def _spread(seqs, n: int):
    import torch

    if seqs.shape[0] <= n:
        return seqs
    return seqs[torch.linspace(0, seqs.shape[0] - 1, n).round().long()]


@dataclass
class _Data:
    domain: dict  # name -> PackedData (val already cut to the evaluation set)
    union: Any  # PackedData: union of the domains' training sequences, val: the evaluation sets together
    mix: Any  # PackedData: equal mix for the mixtures


def latency(model, vocab: int, prompt: int, new: int, seq_len: int, repeats: int) -> tuple[float, float]:
    """(ms per generated token, greedy with the KV cache; ms per forward over seq_len tokens), medians."""
    import statistics

    import torch

    model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (1, prompt), generator=g)
    full = torch.randint(0, vocab, (1, seq_len), generator=g)
    gen, fwd = [], []
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            out = model.generate(
                x, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0
            )
            dt = time.perf_counter() - t0
            assert out.shape[1] == prompt + new
            t1 = time.perf_counter()
            model(full)
            df = time.perf_counter() - t1
            if i:  # the first is a warm-up
                gen.append(1000 * dt / new)
                fwd.append(1000 * df)
    return statistics.median(gen), statistics.median(fwd)
