"""The training run's configuration: one dataclass whose fields are the YAML keys and the
`upcycle train` flags (`metadata=help` feeds the CLI), validated on construction.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upcycle.errors import UpcycleError
from upcycle.io import yamlio
from upcycle.io.yamlio import option

PARALLEL = ("auto", "none", "ddp", "fsdp")


DTYPES = ("auto", "float32", "bfloat16")


SCHEDULES = ("cosine", "wsd")


@dataclass(frozen=True)
class TrainConfig:
    """How to train; every field is a YAML key and an `upcycle train` flag of the same name."""

    lr: float = option(3e-4, "peak learning rate")
    min_lr: float = option(3e-5, "learning rate at the end of the decay")
    warmup: int = option(100, "linear warmup steps (from lr/warmup to lr)")
    schedule: str = option(
        "cosine",
        "after the warmup: cosine (to min_lr at the last step) | wsd (warmup-stable-decay: "
        "lr until the last decay_fraction of the steps, then linear to min_lr)",
        choices=SCHEDULES,
    )
    decay_fraction: float = option(0.2, "wsd: share of the steps spent decaying from lr to min_lr")
    steps: int = option(1000, "optimizer steps (ignored when tokens is set)")
    tokens: int | None = option(None, "token budget: steps = ceil(tokens / tokens per step)")
    batch_size: int = option(8, "sequences per micro-batch and process")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    seq_len: int = option(512, "tokens per sequence")
    clip: float = option(1.0, "gradient clipping by global norm (0: off)")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices and experts only)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    aux_loss_coef: float | None = option(None, "load-balancing coefficient alpha (default: the model's plan, 0.01)")
    z_loss_coef: float | None = option(None, "router z-loss coefficient beta (default: the model's plan, 0)")
    eval_every: int = option(100, "validation every N steps, and at the end (0: only at the end)")
    eval_batches: int = option(8, "validation sequences per evaluation = eval_batches * batch_size (all processes)")
    checkpoint_every: int = option(0, "checkpoint every N steps (0: only the final model)")
    keep_checkpoints: int = option(2, "checkpoints to keep (the newest)")
    seed: int = option(0, "seed for the data order and torch/python/numpy RNGs")
    dtype: str = option("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16", choices=DTYPES)
    parallel: str = option("auto", "auto (DDP under torchrun) | none | ddp | fsdp", choices=PARALLEL)
    pretrain_tokens: float | None = option(None, "dense pretraining tokens, to report this run's compute as a share")
    pretrain_flops: float | None = option(None, "dense pretraining FLOPs (instead of pretrain_tokens)")
    log_every: int = option(1, "write a metrics row every N steps")

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> UpcycleError:
            return UpcycleError(f"{name}: {why}")

        for name in (
            "warmup",
            "steps",
            "batch_size",
            "grad_accum",
            "seq_len",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "keep_checkpoints",
            "seed",
            "log_every",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, f"expected a non-negative integer, got {v!r}")
        for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints", "eval_batches"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        if self.seq_len < 2:
            raise bad("seq_len", "must be at least 2")
        if self.tokens is None and self.steps < 1:
            raise bad("steps", "must be at least 1 (or give a tokens budget)")
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens < 1):
            raise bad("tokens", f"expected a positive integer, got {self.tokens!r}")
        for name in (
            "lr",
            "min_lr",
            "clip",
            "weight_decay",
            "eps",
            "aux_loss_coef",
            "z_loss_coef",
            "pretrain_tokens",
            "pretrain_flops",
        ):
            v = getattr(self, name)
            if v is None and name in ("aux_loss_coef", "z_loss_coef", "pretrain_tokens", "pretrain_flops"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise bad(name, f"must be a non-negative number, got {v!r}")
        if self.eps == 0:  # AdamW divides by sqrt(v) + eps: a parameter with no gradient yet would get 0/0
            raise bad("eps", "must be positive (AdamW divides by sqrt(v) + eps), got 0")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise bad(name, f"must be in [0, 1), got {v!r}")
        if self.min_lr > self.lr:
            raise bad("min_lr", f"{self.min_lr} is above lr {self.lr}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"choose one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if (
            isinstance(self.decay_fraction, bool)
            or not isinstance(self.decay_fraction, (int, float))
            or not (0 < self.decay_fraction <= 1)
        ):
            raise bad("decay_fraction", f"must be in (0, 1], got {self.decay_fraction!r}")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"choose one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.parallel not in PARALLEL:
            raise bad("parallel", f"choose one of {', '.join(PARALLEL)}, got {self.parallel!r}")
        if self.pretrain_tokens is not None and self.pretrain_flops is not None:
            raise bad("pretrain_flops", "give pretrain_tokens or pretrain_flops, not both")

    def total_steps(self, world_size: int = 1) -> int:
        if self.tokens is None:
            return self.steps
        return math.ceil(self.tokens / self.tokens_per_step(world_size))

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.batch_size * self.grad_accum * world_size * self.seq_len

    def decay_start(self, total: int) -> int:
        """wsd: the first step of the decay (every step before it, past the warmup, runs at lr)."""
        return total - max(1, round(self.decay_fraction * total))

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr, or
        (wsd) constant lr, then linear to min_lr over the last decay_fraction of the steps; both reach
        min_lr at the last step. A wsd run's learning rates before its decay do not depend on `total`,
        so a longer run's checkpoint is a shorter one's branch point."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "wsd":
            start = self.decay_start(total)
            if step < start:
                return self.lr
            return self.lr + (self.min_lr - self.lr) * (step - start + 1) / (total - start)
        span = max(1, total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    # Serialisation, as UpcyclePlan: YAML keys are the field names.
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "train config") -> "TrainConfig":
        yamlio.check_fields(cls, d, source, "training fields")
        d = yamlio.numbers(cls, d, source)
        try:
            return cls(**d)
        except (UpcycleError, ValueError) as e:
            raise UpcycleError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(yamlio.read_mapping(path, "training config file"), source=str(path))

    def to_yaml(self, path: str | Path | None = None) -> str:
        return yamlio.dump(self.to_dict(), path)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
