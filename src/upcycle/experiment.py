"""Sparse Upcycling's central comparison at small scale (Komatsuzaki et al., ICLR 2023, Figs. 2-3).

pretrain    a small dense Llama from scratch on an offline corpus for B FLOPs (`pretrain_tokens`),
            warmup then a constant learning rate; or, with `model: smollm2`, start from the embedded
            SmolLM2-135M and call B the dense FLOPs of `reference_tokens` (a unit, not its pretraining)
arms        from that checkpoint, spend the same extra FLOPs (fractions `extra` of B) on:
              dense        the dense model trained on (its AdamW state carried over: the same run)
              upcycled     `surgery.upcycle(dense, plan)`: E=8, top-2, every other layer, aux 0.01;
                           fresh AdamW state (the paper's language recipe)
              upcycled_carry  the same, starting from the dense run's AdamW state mapped onto the
                           experts (`train.carry_over_optimizer_state`; the paper's vision recipe):
                           separates what upcycling does from what a fresh optimizer state does
              depth_tiled  `baselines.depth_tile(dense, factor, mode)`: 2x deeper, stacked copies
              moe_scratch  `baselines.moe_from_scratch(config, plan)`: the upcycled shape from a
                           random init, given the whole budget B plus the extra (its x = FLOPs - B)
schedule    every continued arm runs once to the largest budget at one constant learning rate
            (`continue_lr`, a short linear warmup), and is evaluated at every budget on the way: with
            a constant LR a budget's point does not depend on how long the run goes on after it, so
            one run per arm is the same as one run per budget. moe_scratch uses the pretraining
            schedule (its own warmup, then the same constant LR).
data        one document-level train/validation split; the continued arms see the training
            sequences the pretraining did not (same order for every arm); moe_scratch sees the
            pretraining's sequences first, then the same unseen ones; validation is one fixed set
FLOPs       one counter for every arm, `train.flops_per_token` (forward + backward, active
            parameters, attention); a budget's step is the multiple of the arm's evaluation
            interval closest to the target, and the table reports the FLOPs actually spent
outputs     OUT/results.csv, OUT/results.md, OUT/loss_vs_flops.png, OUT/<run>/metrics.csv; runs
            with a summary.json are skipped when the experiment is run again (resume)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from upcycle import yamlio
from upcycle.errors import UpcycleError

ARMS = ("dense", "upcycled", "upcycled_carry", "depth_tiled", "moe_scratch")
LABELS = {
    "dense": "dense continued",
    "upcycled": "sparse upcycled",
    "upcycled_carry": "sparse upcycled, dense AdamW state carried",
    "depth_tiled": "depth tiled (dense, 2x deep)",
    "moe_scratch": "MoE from scratch (B + extra)",
}
PRETRAINED = ("smollm2",)


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Recipe:
    """One experiment; every field is a YAML key. `tiny:` holds overrides for `--tiny`."""

    name: str = _f("experiment", "name shown in the results")
    seed: int = _f(0, "seed of the split, data order, model and router initialisations")
    corpus: str = _f(
        "python",
        "offline corpus: python (stdlib source) | man | pypi (see data.corpus_documents), "
        "or a path to your own text (file, folder, .jsonl)",
    )
    max_chars: int | None = _f(4_000_000, "characters of the corpus to use (a seeded sample of documents)")
    val_fraction: float = _f(0.05, "share of documents held out for validation")
    seq_len: int = _f(128, "tokens per sequence")
    batch_size: int = _f(16, "sequences per optimizer step")
    tokenizer: Any = field(
        default_factory=lambda: {"vocab_size": 4096},
        metadata={"help": "{vocab_size: N}: byte-level BPE trained on the training documents | model"},
    )
    model: Any = _f(None, "{hidden_size, intermediate_size, num_layers, num_heads[, num_kv_heads]} | smollm2")
    pretrain_tokens: int | None = _f(None, "dense pretraining budget B in tokens (a from-scratch model)")
    reference_tokens: int | None = _f(None, "smollm2: B = dense FLOPs of this many tokens (the unit of extra)")
    lr: float = _f(2e-3, "pretraining (and moe_scratch) peak learning rate, constant after warmup")
    warmup: int = _f(20, "pretraining (and moe_scratch) warmup steps")
    continue_lr: float | None = _f(None, "learning rate of the continued arms (default: lr, the dense run's)")
    continue_warmup: int = _f(5, "warmup steps of the continued arms")
    weight_decay: float = _f(0.1, "AdamW weight decay")
    clip: float = _f(1.0, "gradient clipping")
    dense_keeps_optimizer: bool = _f(True, "the dense continued arm starts from the pretraining's AdamW state")
    extra: tuple = _f((0.1, 0.2, 0.4), "extra compute budgets as fractions of B")
    arms: tuple = _f(ARMS, "which arms to run")
    plan: dict = _f(None, "the upcycling plan (UpcyclePlan keys); default E=8, top-2, every_k:2:1, aux 0.01")
    variants: dict | None = _f(
        None,
        "more upcycled arms: {arm name: plan keys overriding `plan`}, e.g. "
        "{drop: {expert_init: drop}}; list their names in `arms`",
    )
    depth_factor: float = _f(2.0, "depth tiling: layers of the deeper model / layers of the dense one")
    depth_mode: str = _f("stack", "depth tiling: stack ([0..L-1, 0..L-1]) | interleave ([0,0,1,1,..])")
    eval_batches: int = _f(12, "validation batches (of batch_size sequences) per evaluation; the same set each time")
    eval_spread: bool = _f(
        False,
        "evaluate on evenly spaced validation sequences (not the first ones), so a small "
        "evaluation set covers every held-out document",
    )
    threads: int | None = _f(
        None,
        "torch CPU threads (default: torch's choice); 1 is fastest for small models on "
        "a shared CPU, where spinning OpenMP threads wait on each other",
    )
    checkpoint_every: int = _f(0, "checkpoint every N steps inside a run (0: only a finished run is kept)")
    tiny: dict | None = _f(None, "overrides applied by --tiny (a CPU smoke test)")

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
        yamlio.check_fields(cls, d, source, "recipe keys")
        names = [f.name for f in dataclasses.fields(cls)]
        d = dict(d)
        if tiny:
            over = d.get("tiny")
            if not over:
                raise UpcycleError(f"{source}: --tiny needs a `tiny:` section of overrides in the recipe")
            bad = sorted(set(over) - set(names) - {"tiny"})
            if bad:
                raise UpcycleError(f"{source}: tiny: unknown key {bad[0]!r}")
            d.update(over)
            d["name"] = f"{d.get('name', 'experiment')} (tiny)"
        for k in ("lr", "continue_lr", "weight_decay", "clip", "val_fraction"):
            if isinstance(d.get(k), str):
                d[k] = float(d[k])
        for k in ("pretrain_tokens", "reference_tokens", "max_chars"):
            if isinstance(d.get(k), (str, float)):
                d[k] = int(float(d[k]))
        try:
            return cls(**d)
        except TypeError as e:
            raise UpcycleError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path, tiny: bool = False) -> "Recipe":
        return cls.from_dict(yamlio.read_mapping(path, "recipe"), source=str(path), tiny=tiny)


# ----------------------------------------------------------------------------------------- pieces


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
    from transformers import LlamaConfig

    m = recipe.model
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_layers"],
        num_attention_heads=m["num_heads"],
        num_key_value_heads=m.get("num_kv_heads", m["num_heads"]),
        max_position_embeddings=recipe.seq_len,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        bos_token_id=eos,
        eos_token_id=eos,
        use_cache=False,
    )


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


def _split_seen(data, recipe: Recipe, pretrain_steps: int):
    """The training sequences the dense pretraining did not read (for the continued arms)."""
    import torch

    from upcycle.data import Batches, PackedData

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
    seen = set(b._indices(0, consumed))
    rest = [i for i in b._perm_for(0).tolist() if i not in seen]
    need = max(recipe.extra) * pretrain_steps * recipe.batch_size
    if len(rest) < need:
        print(
            f"note: the continued arms read {need:.0f} sequences but only {len(rest)} are unseen; they repeat "
            "some (raise max_chars)"
        )
    return PackedData(data.train[torch.tensor(rest)], data.val, dict(data.info, continuation_sequences=len(rest)))


def _cumulative_time(rows: list[dict]) -> dict[int, float]:
    out, t = {}, 0.0
    tps = None
    for r in rows:
        if r.get("tokens_per_s"):
            # tokens per step is constant inside a run
            tps = tps or (r["tokens"] / r["step"])
            t += tps / r["tokens_per_s"]
        out[int(r["step"])] = t
    return out


def _read_rows(path: Path) -> list[dict]:
    from upcycle.plots import read_metrics

    cols = read_metrics(path)
    n = len(cols["step"])
    return [{k: cols[k][i] for k in cols} for i in range(n)]


# --------------------------------------------------------------------------------------------- runs


class Experiment:
    def __init__(
        self, recipe: Recipe, out_dir: str | Path, progress: bool = True, log=print, command: str | None = None
    ):
        self.r, self.out, self.progress, self.log, self.command = recipe, Path(out_dir), progress, log, command

    # -- setup
    def prepare(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from upcycle.data import CORPORA, corpus_documents, pack_documents, read_documents, split_documents
        from upcycle.default_model import default_model_dir

        r = self.r
        self.out.mkdir(parents=True, exist_ok=True)
        saved = self.out / "recipe.json"
        if saved.is_file():  # arms may be added or dropped; anything else changes every run
            new = r.to_dict()
            defaults = {
                f.name: f.default for f in dataclasses.fields(Recipe) if f.default is not dataclasses.MISSING
            }  # keys added to Recipe since: their defaults
            old = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()} | json.loads(
                saved.read_text()
            )
            diff = sorted(k for k in set(old) | set(new) if k not in ("arms", "tiny") and old.get(k) != new.get(k))
            if diff:
                raise UpcycleError(
                    f"{self.out} holds an experiment with a different recipe ({', '.join(diff)}); "
                    "pass --overwrite or another --out"
                )
        saved.write_text(json.dumps(r.to_dict(), indent=1) + "\n")
        t0 = time.perf_counter()
        if r.corpus in CORPORA:
            docs = corpus_documents(r.corpus, r.max_chars, r.seed)
        else:  # your own text: a file, a folder of text files or a .jsonl file
            docs = read_documents(r.corpus)
        if r.pretrained:
            self.model_dir = default_model_dir(log=self.log)
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        else:
            train_docs, _ = split_documents(docs, r.val_fraction, r.seed)
            self.tokenizer = train_bpe(train_docs, r.tokenizer["vocab_size"], self.out / "tokenizer")
        self.data = pack_documents(docs, self.tokenizer, r.seq_len, r.val_fraction, r.seed, source=f"corpus:{r.corpus}")
        need = r.eval_batches * r.batch_size
        if r.eval_spread and self.data.val.shape[0] > need:
            import torch as _t

            idx = _t.linspace(0, self.data.val.shape[0] - 1, need).round().long()
            self.data.val = self.data.val[idx]
        if self.data.val.shape[0] < need:
            self.log(
                f"note: validation has {self.data.val.shape[0]} sequences, fewer than eval_batches x "
                f"batch_size = {need}; all of them are used"
            )
        self.log(
            f"data: {self.data.info['train_sequences']} train / {self.data.info['val_sequences']} val sequences "
            f"of {r.seq_len} tokens from {len(docs)} documents ({time.perf_counter() - t0:.0f}s)"
        )
        torch.manual_seed(r.seed)
        if r.pretrained:
            self._dense_loader = lambda: AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        else:
            self.config = dense_config(r, len(self.tokenizer), self.tokenizer.eos_token_id)

    def train_config(self, steps: int, every: int, lr: float, warmup: int):
        from upcycle.train.config import TrainConfig

        r = self.r
        return TrainConfig(
            lr=lr,
            min_lr=lr,
            warmup=warmup,
            steps=steps,
            batch_size=r.batch_size,
            seq_len=r.seq_len,
            clip=r.clip,
            weight_decay=r.weight_decay,
            eval_every=every,
            eval_batches=r.eval_batches,
            checkpoint_every=r.checkpoint_every,
            keep_checkpoints=1,
            seed=r.seed,
            log_every=1,
        )

    def _run(
        self, name: str, model, data, config, init_optimizer_state=None, save_model=False, stops: list[int] = ()
    ) -> tuple[list, dict, dict[int, float]]:
        """Train one run (or read it back when it finished before); returns (rows, summary, {step: val loss}).
        The run stops at each step of `stops` (a checkpoint), is evaluated there, and goes on exactly
        (`train`'s resume), so every budget is measured at its own step."""
        from upcycle.train.checkpoint import checkpoints
        from upcycle.train.loop import train

        d = self.out / name
        f_budgets = d / "budgets.json"
        if (d / "summary.json").is_file():
            self.log(f"{name}: finished before, reading {d}/metrics.csv")
            vals = {int(k): v for k, v in json.loads(f_budgets.read_text()).items()} if f_budgets.is_file() else {}
            return _read_rows(d / "metrics.csv"), json.loads((d / "summary.json").read_text()), vals
        vals = (
            {int(k): v for k, v in json.loads(f_budgets.read_text()).items()}
            if f_budgets.is_file() and checkpoints(d)
            else {}
        )
        self.log(
            f"{name}: {config.steps} steps of {config.tokens_per_step()} tokens"
            + (" (resuming)" if checkpoints(d) else "")
        )
        t0 = time.perf_counter()
        rows: list = []
        for stop in sorted(set(s for s in stops if s < config.steps)) + [None]:
            if stop is not None and stop in vals:
                continue
            resume = bool(d.exists() and checkpoints(d))
            rows = train(
                model,
                data,
                config,
                d,
                resume=resume,
                overwrite=not resume,
                init_optimizer_state=None if resume else init_optimizer_state,
                tokenizer=self.tokenizer,
                progress=self.progress,
                save_model=save_model,
                stop_at=stop,
            )
            if stop is not None:
                vals[stop] = self._eval(model)
                d.mkdir(parents=True, exist_ok=True)
                f_budgets.write_text(json.dumps(vals) + "\n")
        vals[config.steps] = rows[-1]["val_loss"]
        f_budgets.write_text(json.dumps(vals) + "\n")
        summary = json.loads((d / "summary.json").read_text())
        summary["wall_s"] = time.perf_counter() - t0
        (d / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return rows, summary, vals

    def _eval(self, model) -> float:
        from upcycle.train.config import TrainConfig
        from upcycle.train.dist import devices
        from upcycle.train.loop import evaluate_loss

        device, autocast = devices(TrainConfig(seq_len=self.r.seq_len), 0)
        model.to(device)
        return float(evaluate_loss(model, self.data.val, self.r.batch_size, self.r.eval_batches, device, autocast))

    def _start_loss(self, name: str, model) -> float:
        """Validation loss of an arm's model before its first step (cached in OUT/start_losses.json)."""
        f = self.out / "start_losses.json"
        cache = json.loads(f.read_text()) if f.is_file() else {}
        if name not in cache:
            cache[name] = self._eval(model)
            f.write_text(json.dumps(cache, indent=1) + "\n")
        return cache[name]

    # -- the experiment
    def run(self) -> dict:
        import torch
        from transformers import AutoModelForCausalLM

        from upcycle.methods.baselines import depth_tile, moe_from_scratch
        from upcycle.methods.surgery import upcycle
        from upcycle.train.checkpoint import checkpoints
        from upcycle.train.flops import flops_per_token
        from upcycle.train.optim import carry_over_optimizer_state

        r = self.r
        t_start = time.perf_counter()
        if r.threads:
            torch.set_num_threads(r.threads)
        self.prepare()
        plan = r.plan_obj
        fr = sorted(r.extra)
        tps = r.tokens_per_step
        # 1. the dense checkpoint and B
        if r.pretrained:
            load_dense = self._dense_loader
            dense = load_dense()
            fpt_dense = flops_per_token(dense, r.seq_len)
            B = float(fpt_dense * r.reference_tokens)
            pretrain_steps, pre_summary, dense_opt = 0, None, None
            cont_data = self.data
        else:
            torch.manual_seed(r.seed)
            dense = AutoModelForCausalLM.from_config(self.config)
            fpt_dense = flops_per_token(dense, r.seq_len)
            pretrain_steps = math.ceil(r.pretrain_tokens / tps)
            B_planned = float(fpt_dense * pretrain_steps * tps)
            every, _ = budget_steps(fr + [1.0], B_planned, fpt_dense, tps)
            cfg = self.train_config(pretrain_steps, every, r.lr, r.warmup).replace(checkpoint_every=pretrain_steps)
            _, pre_summary, _ = self._run("pretrain", dense, self.data, cfg, save_model=True)
            B = float(pre_summary["flops"])
            ckpt = checkpoints(self.out / "pretrain")[-1]
            dense_opt = (
                torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
                if r.dense_keeps_optimizer
                else None
            )

            def load_dense():
                return AutoModelForCausalLM.from_pretrained(self.out / "pretrain" / "model", dtype=torch.float32)

            cont_data = _split_seen(self.data, r, pretrain_steps)
            del dense
            dense = load_dense()
        dense_val = self._start_loss("dense", dense)
        self.log(f"dense checkpoint: validation loss {dense_val:.4f}; B = {B:.3e} FLOPs")

        # 2. the arms
        lr_c = r.continue_lr if r.continue_lr is not None else r.lr
        results: list[dict] = []
        curves: dict[str, list[tuple[float, float]]] = {}  # x = extra FLOPs
        whole: dict[str, list[tuple[float, float]]] = {}  # x = all training FLOPs, pretraining included
        if not r.pretrained:
            whole["pretrain"] = [
                (x["flops"], x["val_loss"])
                for x in _read_rows(self.out / "pretrain" / "metrics.csv")
                if x.get("val_loss") is not None
            ]
        summaries: dict[str, dict] = {}
        for arm in r.arms:
            scratch = arm == "moe_scratch"
            if arm == "dense":
                model = load_dense()
            elif arm == "upcycled" or arm in (r.variants or {}):
                model = upcycle(load_dense(), r.variant_plan(arm), inplace=True, tokenizer=self.tokenizer)
            elif arm == "upcycled_carry":
                model = upcycle(load_dense(), plan, inplace=True)
                if dense_opt is None:
                    raise UpcycleError("upcycled_carry needs dense_keeps_optimizer: true (the dense AdamW state)")
                init_opt = carry_over_optimizer_state(dense_opt, load_dense(), model, plan)
            elif arm == "depth_tiled":
                model = depth_tile(load_dense(), factor=r.depth_factor, mode=r.depth_mode)
            else:
                if r.pretrained:
                    model = moe_from_scratch(load_dense().config, plan, seed=r.seed)
                else:
                    model = moe_from_scratch(self.config, plan, seed=r.seed)
            model.train()
            fpt = flops_per_token(model, r.seq_len)
            shares = ([1.0] + [1.0 + f for f in fr]) if scratch else fr
            every, steps = budget_steps(shares, B, fpt, tps)
            total = max(steps.values())
            if scratch:
                cfg = self.train_config(total, every, r.lr, r.warmup)
                start = None
            else:
                cfg = self.train_config(total, every, lr_c, r.continue_warmup)
                start = self._start_loss(arm, model)
            if arm == "dense":  # train() copies a given state, so the later upcycled_carry arm sees it unchanged
                init_opt = dense_opt
            elif arm != "upcycled_carry":
                init_opt = None
            rows, summ, vals = self._run(
                arm,
                model,
                self.data if scratch else cont_data,
                cfg,
                init_optimizer_state=init_opt,
                stops=list(steps.values()),
            )
            for c in checkpoints(self.out / arm):  # a finished arm's checkpoints are not needed again
                shutil.rmtree(c, ignore_errors=True)
            summ["flops_per_token"] = fpt
            summaries[arm] = summ
            del model
            times = _cumulative_time(rows)
            by_step = {int(x["step"]): x for x in rows}
            offset = B if scratch else 0.0
            pts = [] if start is None else [(0.0, start)]
            pts += [(by_step[k]["flops"] - offset, v) for k, v in vals.items()]
            pts += [
                (x["flops"] - offset, x["val_loss"])
                for x in rows
                if x.get("val_loss") is not None and int(x["step"]) not in vals
            ]
            whole[arm] = sorted((x + (offset if scratch else B), v) for x, v in pts)
            pts = [p for p in pts if p[0] >= -0.02 * B]
            curves[arm] = pts
            if start is not None:
                results.append(self._row(arm, 0.0, 0, 0, 0.0, 0.0, start, 0.0, fpt, B))
            for share, step in steps.items():
                x = by_step[step]
                target = share - (1.0 if scratch else 0.0)
                results.append(
                    self._row(
                        arm,
                        target,
                        step,
                        x["tokens"],
                        x["flops"],
                        x["flops"] - offset,
                        vals[step],
                        times.get(step, 0.0),
                        fpt,
                        B,
                    )
                )
        total_s = time.perf_counter() - t_start
        runs = {"pretrain": pre_summary, **summaries} if pre_summary else dict(summaries)
        info = {
            "recipe": r.to_dict(),
            "machine": machine(),
            "B_flops": B,
            "dense_flops_per_token": fpt_dense,
            "runs_wall_s": sum(x.get("wall_s", 0.0) for x in runs.values() if x),
            "pretrain_steps": pretrain_steps,
            "pretrain_tokens": pretrain_steps * tps,
            "pretrain_summary": pre_summary,
            "dense_val_loss": dense_val,
            "wall_s": total_s,
            "data": self.data.info,
            "plan": plan.to_dict(),
            "arms": summaries,
            "curves": curves,
            "whole_curves": whole,
            "command": self.command,
            "tokenizer": "model" if r.pretrained else f"byte-level BPE, {len(self.tokenizer)} tokens",
        }
        self.write(results, curves, info)
        return {"rows": results, "curves": curves, "info": info}

    @staticmethod
    def _row(arm, target, step, tokens, flops, extra, val, wall, fpt, B) -> dict:
        return {
            "arm": arm,
            "target_extra": round(target, 6),
            "step": int(step),
            "tokens": int(tokens),
            "flops": float(flops),
            "extra_flops": float(extra),
            "extra_share": float(extra) / B,
            "val_loss": float(val),
            "val_ppl": math.exp(float(val)),
            "train_time_s": round(float(wall), 2),
            "flops_per_token": int(fpt),
        }

    # -- outputs
    def write(self, rows: list[dict], curves: dict, info: dict) -> None:
        with open(self.out / "results.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        (self.out / "results.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
        (self.out / "results.md").write_text(results_markdown(rows, info))
        plot(curves, rows, info, self.out / "loss_vs_flops.png")


def _fmt_flops(v: float) -> str:
    return f"{v:.3g}"


def results_markdown(rows: list[dict], info: dict) -> str:
    r = info["recipe"]
    m = info["machine"]
    arms = list(dict.fromkeys(x["arm"] for x in rows))
    targets = sorted({x["target_extra"] for x in rows})
    B = info["B_flops"]
    lines = [f"# {r['name']}: validation loss at equal extra compute", ""]
    if r["model"] == "smollm2" or isinstance(r["model"], str):
        lines += [
            f"Start: SmolLM2-135M-Instruct (dense). B (the unit of extra compute) = dense FLOPs of "
            f"{r['reference_tokens']:,} tokens = {_fmt_flops(B)} FLOPs; SmolLM2's own pretraining is not B."
        ]
    else:
        mm = r["model"]
        lines += [
            f"Dense Llama from scratch: d={mm['hidden_size']}, d_ff={mm['intermediate_size']}, "
            f"{mm['num_layers']} layers, {mm['num_heads']} heads, {info['tokenizer']}, tied embeddings; "
            f"pretrained for B = {info['pretrain_tokens']:,} tokens = {_fmt_flops(B)} FLOPs."
        ]
    p = info["plan"]
    lines += [
        f"Corpus `{r['corpus']}` ({info['data']['train_sequences']:,} train / {info['data']['val_sequences']:,} "
        f"val sequences of {r['seq_len']} tokens, split by document); validation loss on the same "
        f"{min(r['eval_batches'] * r['batch_size'], info['data']['val_sequences'])} held-out sequences for "
        "every point.",
        f"Dense checkpoint validation loss: **{info['dense_val_loss']:.4f}**. Upcycling plan: "
        f"E={p['num_experts']}, top-{p['top_k']}, layers {p['layers']}, aux {p['aux_loss_coef']}.",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['threads']} torch thread(s); the machine was shared, "
        f"load average {m.get('load_average_1min', '?')} at the end), device {m['device']}, torch {m['torch']}"
        f"; the runs took {info['runs_wall_s'] / 60:.1f} min (training and evaluation).",
    ]
    if r.get("variants"):
        lines += [
            "Upcycled variants (plan keys over the plan above): "
            + "; ".join(f"**{n}** `{json.dumps(v)}`" for n, v in r["variants"].items())
            + "."
        ]
    if info.get("command"):
        lines += [f"Command: `{info['command']}`"]
    lines += [""]
    lines += ["## Validation loss by extra compute (fraction of B)", ""]
    head = "| extra compute | " + " | ".join(_label(a) for a in arms) + " |"
    lines += [head, "|" + "---|" * (len(arms) + 1)]
    by = {(x["arm"], x["target_extra"]): x for x in rows}
    for t in targets:
        cells = []
        vals = {a: by[(a, t)]["val_loss"] for a in arms if (a, t) in by}
        best = min(vals.values()) if vals else None
        for a in arms:
            x = by.get((a, t))
            if x is None:
                cells.append("")
                continue
            s = f"{x['val_loss']:.4f}"
            cells.append(f"**{s}**" if len(vals) > 1 and x["val_loss"] == best else s)
        lines.append(f"| {t:.0%} | " + " | ".join(cells) + " |")
    if "moe_scratch" in arms:
        lines += [
            "",
            "MoE from scratch: its 0% point is after B FLOPs of its own training from a random init; each "
            "later point after B + extra.",
        ]
    if len(arms) > 2:
        top = targets[-1]
        ranked = sorted((by[(a, top)] for a in arms if (a, top) in by), key=lambda x: x["val_loss"])
        ref = by.get(("upcycled", top)) or by.get(("dense", top))
        lines += [
            "",
            f"## Ranking at {top:.0%} extra compute (equal FLOPs)",
            "",
            f"| rank | arm | val loss | vs {ref['arm'] if ref else '-'} | FLOPs/token | steps |",
            "|---|---|---|---|---|---|",
        ]
        for k, x in enumerate(ranked, 1):
            d = f"{x['val_loss'] - ref['val_loss']:+.4f}" if ref else ""
            lines.append(
                f"| {k} | {_label(x['arm'])} | {x['val_loss']:.4f} | {d} | {x['flops_per_token']:,} | {x['step']} |"
            )
    lines += [
        "",
        "## Every point",
        "",
        "| arm | target extra | step | tokens | training FLOPs | extra FLOPs | extra / B | val loss | val ppl "
        "| train time (s) | FLOPs/token |",
        "|" + "---|" * 11,
    ]
    for x in rows:
        lines.append(
            f"| {x['arm']} | {x['target_extra']:.0%} | {x['step']} | {x['tokens']:,} | "
            f"{_fmt_flops(x['flops'])} | {_fmt_flops(x['extra_flops'])} | {x['extra_share']:.1%} | "
            f"{x['val_loss']:.4f} | {x['val_ppl']:.2f} | {x['train_time_s']:.0f} | {x['flops_per_token']:,} |"
        )
    lines += [
        "",
        "FLOPs: `upcycle.train.flops_per_token` for every arm (6 x active parameters + attention, forward + "
        "backward; experts counted top-k times, the router included). Train time: optimizer steps only, no "
        "evaluation.",
        "",
    ]
    return "\n".join(lines)


def _colour(arm: str) -> str:
    from upcycle.plots import PALETTE

    if arm not in ARMS and arm != "pretrain":  # a plan variant: a colour of its own, by its first use
        import matplotlib

        n = _VARIANT_COLOURS.setdefault(arm, len(_VARIANT_COLOURS))
        return matplotlib.colors.to_hex(matplotlib.colormaps["tab20"]((2 * n + 1 + n // 10) % 20))
    return "#333333" if arm == "pretrain" else PALETTE[ARMS.index(arm) % len(PALETTE)]


_VARIANT_COLOURS: dict[str, int] = {}


def _label(arm: str) -> str:
    return LABELS.get(arm, f"upcycled: {arm}")


def plot(curves: dict, rows: list[dict], info: dict, out_png: Path) -> Path:
    """Left: validation loss vs extra compute (% of B), one curve per arm, the budgets marked. Right (a
    model pretrained here): the same runs against all their training FLOPs, the dense pretraining included,
    so MoE-from-scratch is seen from its start."""
    from upcycle.plots import _plt, _save

    plt = _plt()
    B = info["B_flops"]
    whole = info.get("whole_curves") or {}
    two = "pretrain" in whole
    fig, axes = plt.subplots(
        1,
        2 if two else 1,
        figsize=(15, 5.6) if two else (8.5, 5.2),
        gridspec_kw={"width_ratios": [1.25, 1]} if two else None,
    )
    ax = axes[0] if two else axes
    targets = sorted({x["target_extra"] for x in rows if x["target_extra"] > 0})
    for t in targets:
        ax.axvline(100 * t, color="0.75", ls=":", lw=1.0, zorder=0)
    ax.axhline(info["dense_val_loss"], color="0.35", ls="--", lw=1.0, zorder=0)
    ax.annotate(
        f"dense checkpoint {info['dense_val_loss']:.3f}",
        (0.01, info["dense_val_loss"]),
        xycoords=("axes fraction", "data"),
        xytext=(2, 3),
        textcoords="offset points",
        fontsize=9,
        color="0.3",
    )
    ys = []
    for arm, pts in curves.items():
        pts = sorted(pts)
        if not pts:
            continue
        c = _colour(arm)
        xs = [100 * x / B for x, _ in pts]
        vs = [y for _, y in pts]
        bud = sorted((x for x in rows if x["arm"] == arm), key=lambda x: x["extra_share"])
        ax.plot(xs, vs, color=c, lw=1.6, alpha=0.9, label=f"{_label(arm)}  ({bud[-1]['val_loss']:.3f})")
        ax.plot([100 * x["extra_share"] for x in bud], [x["val_loss"] for x in bud], "o", color=c, ms=6)
        ys += vs
    lo = min(ys + [info["dense_val_loss"]])
    finals = [x["val_loss"] for x in rows]
    hi = max(max(finals), info["dense_val_loss"])
    pad = 0.15 * (hi - lo) + 1e-3
    if max(ys) > hi + pad:
        ax.set_ylim(lo - pad, hi + 3 * pad)
    r = info["recipe"]
    unit = (
        f"B = {B:.3g} FLOPs = the dense model on {r['reference_tokens']:,} tokens"
        if r.get("reference_tokens")
        else f"B = {B:.3g} FLOPs = the dense pretraining"
    )
    ax.set_xlabel(f"extra training compute, % of B\n({unit}; dots: the budgets in the table)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{r['name']}: validation loss vs extra compute", loc="left", fontweight="bold")
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=True, framealpha=0.9, edgecolor="none", loc="upper right", fontsize=9, bbox_to_anchor=(1.0, 0.93))
    if two:
        ax2 = axes[1]
        for arm, pts in whole.items():
            if not pts:
                continue
            label = "dense pretraining (B)" if arm == "pretrain" else _label(arm)
            ax2.plot(
                [100 * x / B for x, _ in pts],
                [y for _, y in pts],
                color=_colour(arm),
                lw=2.2 if arm == "pretrain" else 1.5,
                label=label,
            )
        ax2.axvline(100, color="0.35", ls="--", lw=1.0)
        ax2.annotate(
            "end of dense pretraining",
            (100, 0.03),
            xycoords=("data", "axes fraction"),
            rotation=90,
            ha="right",
            va="bottom",
            fontsize=9,
            color="0.3",
            xytext=(-3, 0),
            textcoords="offset points",
        )
        x0 = 60.0  # the last stretch of pretraining and everything after it
        allv = [y for pts in whole.values() for x, y in pts if 100 * x / B >= x0]
        ax2.set_xlim(x0, max(100 * x / B for pts in whole.values() for x, _ in pts) + 3)
        ax2.set_ylim(lo - pad, max(allv) + pad)
        ax2.set_xlabel("all training compute, % of B (pretraining included; from 60%)")
        ax2.set_ylabel("validation loss")
        ax2.set_title("the same runs from their start", loc="left", fontweight="bold")
        ax2.grid(True, alpha=0.3)
        ax2.legend(frameon=False, loc="upper right", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)


def run_experiment(
    recipe: Recipe, out_dir: str | Path, progress: bool = True, log=print, command: str | None = None
) -> dict:
    """Run (or resume) the experiment of `recipe` in out_dir; returns {rows, curves, info}. The torch thread
    count the recipe asks for holds during the run only."""
    import torch

    threads = torch.get_num_threads()
    try:
        return Experiment(recipe, out_dir, progress, log, command).run()
    finally:
        torch.set_num_threads(threads)
