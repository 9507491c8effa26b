"""The sparse-upcycling study's recipe: arms, budgets and model sizes, one YAML file per run."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upcycle.errors import UpcycleError
from upcycle.io import yamlio
from upcycle.io.yamlio import option

ARMS = ("dense", "upcycled", "upcycled_carry", "depth_tiled", "moe_scratch")


LABELS = {
    "dense": "dense continued",
    "upcycled": "sparse upcycled",
    "upcycled_carry": "sparse upcycled, dense AdamW state carried",
    "depth_tiled": "depth tiled (dense, 2x deep)",
    "moe_scratch": "MoE from scratch (B + extra)",
}


PRETRAINED = ("smollm2",)


@dataclass(frozen=True)
class Recipe:
    """One experiment; every field is a YAML key. `tiny:` holds overrides for `--tiny`."""

    name: str = option("experiment", "name shown in the results")
    seed: int = option(0, "seed of the split, data order, model and router initialisations")
    corpus: str = option(
        "python",
        "offline corpus: python (stdlib source) | man | pypi (see data.corpus_documents), "
        "or a path to your own text (file, folder, .jsonl)",
    )
    max_chars: int | None = option(4_000_000, "characters of the corpus to use (a seeded sample of documents)")
    val_fraction: float = option(0.05, "share of documents held out for validation")
    seq_len: int = option(128, "tokens per sequence")
    batch_size: int = option(16, "sequences per optimizer step")
    tokenizer: Any = field(
        default_factory=lambda: {"vocab_size": 4096},
        metadata={"help": "{vocab_size: N}: byte-level BPE trained on the training documents | model"},
    )
    model: Any = option(None, "{hidden_size, intermediate_size, num_layers, num_heads[, num_kv_heads]} | smollm2")
    pretrain_tokens: int | None = option(None, "dense pretraining budget B in tokens (a from-scratch model)")
    reference_tokens: int | None = option(None, "smollm2: B = dense FLOPs of this many tokens (the unit of extra)")
    lr: float = option(2e-3, "pretraining (and moe_scratch) peak learning rate, constant after warmup")
    warmup: int = option(20, "pretraining (and moe_scratch) warmup steps")
    continue_lr: float | None = option(None, "learning rate of the continued arms (default: lr, the dense run's)")
    continue_warmup: int = option(5, "warmup steps of the continued arms")
    weight_decay: float = option(0.1, "AdamW weight decay")
    clip: float = option(1.0, "gradient clipping")
    dense_keeps_optimizer: bool = option(True, "the dense continued arm starts from the pretraining's AdamW state")
    extra: tuple = option((0.1, 0.2, 0.4), "extra compute budgets as fractions of B")
    arms: tuple = option(ARMS, "which arms to run")
    plan: dict = option(None, "the upcycling plan (UpcyclePlan keys); default E=8, top-2, every_k:2:1, aux 0.01")
    variants: dict | None = option(
        None,
        "more upcycled arms: {arm name: plan keys overriding `plan`}, e.g. "
        "{drop: {expert_init: drop}}; list their names in `arms`",
    )
    depth_factor: float = option(2.0, "depth tiling: layers of the deeper model / layers of the dense one")
    depth_mode: str = option("stack", "depth tiling: stack ([0..L-1, 0..L-1]) | interleave ([0,0,1,1,..])")
    eval_batches: int = option(
        12, "validation batches (of batch_size sequences) per evaluation; the same set each time"
    )
    eval_spread: bool = option(
        False,
        "evaluate on evenly spaced validation sequences (not the first ones), so a small "
        "evaluation set covers every held-out document",
    )
    threads: int | None = option(
        None,
        "torch CPU threads (default: torch's choice); 1 is fastest for small models on "
        "a shared CPU, where spinning OpenMP threads wait on each other",
    )
    checkpoint_every: int = option(0, "checkpoint every N steps inside a run (0: only a finished run is kept)")
    tiny: dict | None = option(None, "overrides applied by --tiny (a CPU smoke test)")

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> UpcycleError:
            return UpcycleError(f"recipe {self.name!r}: {key}: {why}")

        object.__setattr__(self, "extra", tuple(float(x) for x in self.extra))
        object.__setattr__(self, "arms", tuple(self.arms))
        if not self.extra or any(not 0 < x <= 100 for x in self.extra):
            raise bad("extra", f"give positive fractions of B, e.g. [0.1, 0.2, 0.4]; got {list(self.extra)}")
        variants = self.variants or {}
        if not isinstance(variants, dict) or any(not isinstance(v, dict) for v in variants.values()):
            raise bad("variants", "give {arm name: {plan key: value, ...}, ...}")
        clash = [n for n in variants if n in ARMS or not str(n).replace("_", "").isalnum()]
        if clash:
            raise bad(
                "variants",
                f"{clash[0]!r}: a variant's name is a new arm name (letters, digits, _), not one of {', '.join(ARMS)}",
            )
        for n in variants:
            self.variant_plan(n)  # validates
        unknown = [a for a in self.arms if a not in ARMS and a not in variants]
        if unknown or not self.arms:
            raise bad(
                "arms",
                f"unknown arm {unknown[0] if unknown else None!r}; choose from {', '.join(ARMS + tuple(variants))}",
            )
        pretrained = isinstance(self.model, str)
        if pretrained and self.model not in PRETRAINED:
            raise bad("model", f"a pretrained model is one of {', '.join(PRETRAINED)}, got {self.model!r}")
        if pretrained and "upcycled_carry" in self.arms:
            raise bad("arms", "upcycled_carry needs the dense run's optimizer state; a pretrained model has none")
        if not pretrained:
            if not isinstance(self.model, dict):
                raise bad("model", "give the shape {hidden_size, intermediate_size, num_layers, num_heads} or smollm2")
            missing = {"hidden_size", "intermediate_size", "num_layers", "num_heads"} - set(self.model)
            if missing:
                raise bad("model", f"missing {sorted(missing)}")
            if not self.pretrain_tokens or self.pretrain_tokens < self.batch_size * self.seq_len:
                raise bad(
                    "pretrain_tokens", "a model trained from scratch needs a pretraining budget of at least one batch"
                )
            if isinstance(self.tokenizer, str):
                raise bad("tokenizer", "a model from scratch gets a BPE tokenizer: {vocab_size: N}")
        else:
            if not self.reference_tokens:
                raise bad("reference_tokens", "a pretrained model needs the token count that defines B")
        if self.tokenizer != "model" and not (
            isinstance(self.tokenizer, dict) and set(self.tokenizer) == {"vocab_size"}
        ):
            raise bad("tokenizer", f"give {{vocab_size: N}} or model, got {self.tokenizer!r}")
        if self.depth_mode not in ("stack", "interleave"):
            raise bad("depth_mode", f"stack or interleave, got {self.depth_mode!r}")
        for k in ("seq_len", "batch_size", "eval_batches"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise bad(k, "must be a positive integer")
        # Everything the arms build later is checked now, before OUT is written: the plan, the deeper
        # model's depth, the model shape (transformers' own config checks) and the learning rates.
        self.plan_obj  # noqa: B018 - validates
        f = self.depth_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or ("depth_tiled" in self.arms and not f > 1):
            raise bad("depth_factor", f"must be above 1 (the deeper model's depth / the dense one's), got {f!r}")
        for k in ("lr", "continue_lr", "weight_decay", "clip"):
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf):
                raise bad(k, f"must be a non-negative number, got {v!r}")
        if not pretrained:
            try:
                from transformers import LlamaConfig

                LlamaConfig(**decoder_shape(self.model, self.seq_len, 256, 0))
            except Exception as e:  # noqa: BLE001 - transformers' config validators raise their own classes
                raise bad("model", str(e).strip().splitlines()[-1].strip()) from None

    @property
    def pretrained(self) -> bool:
        return isinstance(self.model, str)

    @property
    def plan_obj(self):
        from upcycle.methods.plan import UpcyclePlan

        return UpcyclePlan.from_dict(dict(self.plan or {}), source=f"recipe {self.name!r} plan")

    def variant_plan(self, arm: str):
        """The plan of an upcycled arm: `plan`, with the variant's overrides for a variant arm."""
        from upcycle.methods.plan import UpcyclePlan

        over = (self.variants or {}).get(arm, {})
        return UpcyclePlan.from_dict(dict(self.plan or {}) | dict(over), source=f"recipe {self.name!r} variant {arm!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["extra"], d["arms"] = list(self.extra), list(self.arms)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "recipe", tiny: bool = False) -> "Recipe":
        return yamlio.recipe_from_dict(cls, d, source, tiny)

    @classmethod
    def from_yaml(cls, path: str | Path, tiny: bool = False) -> "Recipe":
        return cls.from_dict(yamlio.read_mapping(path, "recipe"), source=str(path), tiny=tiny)


def decoder_shape(model: dict, seq_len: int, vocab_size: int, eos: int) -> dict:
    """The config fields every study's small decoder shares, from a recipe's `model:` shape: tied embeddings,
    GQA where num_kv_heads is given, positions up to seq_len, eos as bos, init std 0.02, no KV cache."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=model["hidden_size"],
        intermediate_size=model["intermediate_size"],
        num_hidden_layers=model["num_layers"],
        num_attention_heads=model["num_heads"],
        num_key_value_heads=model.get("num_kv_heads", model["num_heads"]),
        max_position_embeddings=seq_len,
        tie_word_embeddings=True,
        initializer_range=0.02,
        bos_token_id=eos,
        eos_token_id=eos,
        use_cache=False,
    )
