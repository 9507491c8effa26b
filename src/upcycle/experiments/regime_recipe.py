"""The regime study's recipe and its plan of runs (see `upcycle.experiments.regime` for the protocol)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from upcycle.errors import UpcycleError
from upcycle.io import yamlio
from upcycle.io.yamlio import option

KINDS = ("dense", "upcycled", "moe_scratch", "dense_wide_scratch")
OPTIMIZER = ("reset", "carry")


@dataclass(frozen=True)
class RegimeRecipe:
    """The regime study; every field is a YAML key (`study: regime` selects this kind of recipe)."""

    study: str = option("regime", "the kind of recipe: regime")
    name: str = option("upcycling-regime", "name shown in the results")
    corpus: str = option(
        "python+packages",
        "offline corpus (see data.corpus_documents), or a path to your own text (file, folder, .jsonl)",
    )
    max_chars: int | None = option(None, "characters of the corpus to use (a seeded sample of documents; null: all)")
    val_fraction: float = option(0.02, "share of documents held out for validation")
    eval_sequences: int = option(256, "held-out sequences per evaluation (the same ones every time)")
    seq_len: int = option(128, "tokens per sequence")
    batch_size: int = option(16, "sequences per optimizer step")
    vocab_size: int = option(1024, "byte-level BPE trained on the training documents, shared by every size")
    sizes: dict = option(None, "{size name: {hidden_size, intermediate_size, num_layers, num_heads}}")
    main: dict = option(None, "{size: NAME, tokens_per_param: N}: the main setting, where every arm runs")
    lr: float = option(3e-3, "the stable learning rate (pretraining and every continued arm)")
    warmup: int = option(100, "pretraining (and scratch arms') warmup steps")
    rewarm: float = option(0.01, "continued arms: re-warm over this share of B FLOPs")
    decay_fraction: float = option(0.2, "share of each budget spent decaying")
    final_lr_ratio: float = option(0.1, "the decay ends at this share of lr")
    weight_decay: float = option(0.1, "AdamW weight decay")
    clip: float = option(1.0, "gradient clipping")
    optimizer: str = option("reset", "reset: a fresh AdamW state in every arm | carry: the dense run's (mapped)")
    extra: tuple = option((0.25, 0.5, 1.0), "budgets: extra FLOPs as shares of B")
    plan: dict = option(None, "the base upcycling plan (UpcyclePlan keys)")
    arms: dict = option(
        None,
        "{arm: {kind: dense|upcycled|moe_scratch|dense_wide_scratch, plan: {overrides}, "
        "seeds: N, optimizer: reset|carry}} in the order they run",
    )
    map: dict | None = option(None, "{size name: [tokens per parameter, ...]}: the crossover map's branch points")
    map_arms: tuple = option(("dense", "upcycled"), "arms at every map point")
    map_best_other: bool = option(
        True,
        "also run, at every map point, the best other arm of the main setting "
        "(lowest mean loss at the largest budget), once the main setting is done",
    )
    map_seeds: int = option(3, "seeds at every map point")
    eval_every: float = option(0.05, "evaluate every this share of B FLOPs along each run")
    checkpoint_every: float = option(0.1, "checkpoint every this share of a run's steps (resume after a kill)")
    pretrain_seed: int = option(0, "seed of the dense pretraining (its data order and initialisation)")
    threads: int = option(1, "torch threads per run")
    workers: int = option(2, "runs side by side (processes)")
    tiny: dict | None = option(None, "overrides applied by --tiny (the smoke test)")

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> UpcycleError:
            return UpcycleError(f"recipe {self.name!r}: {key}: {why}")

        object.__setattr__(self, "extra", tuple(sorted(float(x) for x in self.extra)))
        object.__setattr__(self, "map_arms", tuple(self.map_arms))
        if self.study != "regime":
            raise bad("study", f"this runner takes study: regime, got {self.study!r}")
        if not self.extra or any(not 0 < x <= 100 for x in self.extra):
            raise bad("extra", f"give positive shares of B, got {list(self.extra)}")
        if not isinstance(self.sizes, dict) or not self.sizes:
            raise bad("sizes", "give {name: {hidden_size, intermediate_size, num_layers, num_heads}}")
        for n, m in self.sizes.items():
            missing = {"hidden_size", "intermediate_size", "num_layers", "num_heads"} - set(m or {})
            if missing:
                raise bad(f"sizes.{n}", f"missing {sorted(missing)}")
        if (
            not isinstance(self.main, dict)
            or self.main.get("size") not in self.sizes
            or not (isinstance(self.main.get("tokens_per_param"), (int, float)) and self.main["tokens_per_param"] > 0)
        ):
            raise bad("main", "give {size: one of sizes, tokens_per_param: N > 0}")
        if not isinstance(self.arms, dict) or "dense" not in self.arms:
            raise bad("arms", "give {arm: {kind: ...}, ...}, with a dense arm")
        for a, spec in self.arms.items():
            if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
                raise bad(f"arms.{a}", f"kind must be one of {', '.join(KINDS)}")
            unknown = set(spec) - {"kind", "plan", "seeds", "optimizer", "decay"}
            if unknown:
                raise bad(f"arms.{a}", f"unknown key {sorted(unknown)[0]!r}")
            if spec.get("decay", "budget") not in ("budget", "extra") or (
                spec.get("decay") == "extra" and spec["kind"] not in ("moe_scratch", "dense_wide_scratch")
            ):
                raise bad(f"arms.{a}.decay", "budget (the default) or extra (scratch arms only)")
            if spec.get("optimizer", self.optimizer) not in OPTIMIZER:
                raise bad(f"arms.{a}.optimizer", f"reset or carry, got {spec.get('optimizer')!r}")
            if spec["kind"] in ("upcycled", "moe_scratch"):
                self.arm_plan(a)  # validates
        for a in self.map_arms:
            if a not in self.arms:
                raise bad("map_arms", f"{a!r} is not an arm")
        for n, amounts in (self.map or {}).items():
            if n not in self.sizes or not amounts or any(not x > 0 for x in amounts):
                raise bad(f"map.{n}", "give a size name and positive tokens per parameter")
        if self.optimizer not in OPTIMIZER:
            raise bad("optimizer", f"reset or carry, got {self.optimizer!r}")
        if not 0 < self.decay_fraction < 1 or not 0 < self.final_lr_ratio <= 1 or not 0 <= self.rewarm < 0.5:
            raise bad("decay_fraction", "decay_fraction in (0, 1), final_lr_ratio in (0, 1], rewarm in [0, 0.5)")

    def arm_plan(self, arm: str):
        from upcycle.methods.plan import UpcyclePlan

        over = self.arms[arm].get("plan") or {}
        return UpcyclePlan.from_dict(dict(self.plan or {}) | dict(over), source=f"recipe {self.name!r} arm {arm!r}")

    def seeds(self, arm: str) -> int:
        return int(self.arms[arm].get("seeds", 1))

    def arm_optimizer(self, arm: str) -> str:
        return self.arms[arm].get("optimizer", self.optimizer)

    def branch_points(self, size: str) -> list[float]:
        pts = set((self.map or {}).get(size, []))
        if size == self.main["size"]:
            pts.add(float(self.main["tokens_per_param"]))
        return sorted(float(x) for x in pts)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["extra"], d["map_arms"] = list(self.extra), list(self.map_arms)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "recipe", tiny: bool = False) -> "RegimeRecipe":
        return yamlio.recipe_from_dict(cls, d, source, tiny)


# ----------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    """One unit of work: a size's dense pretraining (arm None) or one (arm, seed) at a branch point."""

    size: str
    tpp: float | None = None
    arm: str | None = None
    seed: int = 0

    @property
    def name(self) -> str:
        if self.arm is None:
            return f"{self.size}/pretrain"
        return f"{self.size}/tpp-{self.tpp:g}/{self.arm}/seed-{self.seed}"


def plan_jobs(r: RegimeRecipe, best_other: str | None = None) -> list[Job]:
    """Every job of the study in the order they should run: pretrainings, the main setting's arms with
    several seeds (seed by seed: the core comparison and its spread first), its other arms in the
    recipe's order, then the map."""
    jobs = [Job(s) for s in r.sizes if r.branch_points(s)]
    main = (r.main["size"], float(r.main["tokens_per_param"]))
    multi = [a for a in r.arms if r.seeds(a) > 1]
    for seed in range(max([r.seeds(a) for a in multi], default=0)):
        jobs += [Job(*main, arm=a, seed=seed) for a in multi if seed < r.seeds(a)]
    jobs += [Job(*main, arm=a, seed=s) for a in r.arms if a not in multi for s in range(r.seeds(a))]
    map_arms = list(r.map_arms) + ([best_other] if best_other and best_other not in r.map_arms else [])
    for size, amounts in (r.map or {}).items():
        for tpp in sorted(float(x) for x in amounts):
            for seed in range(r.map_seeds):
                jobs += [Job(size, tpp, a, seed) for a in map_arms if not ((size, tpp) == main and seed < r.seeds(a))]
    seen, out = set(), []
    for j in jobs:
        if j not in seen:
            seen.add(j)
            out.append(j)
    return out


def job_dir(out: Path, job: Job) -> Path:
    return out / job.name


def job_done(out: Path, job: Job) -> bool:
    if job.arm is None:
        return (job_dir(out, job) / "done.json").is_file()
    return (job_dir(out, job) / "result.json").is_file()


def best_other_arm(r: RegimeRecipe, out: Path) -> str | None:
    """The MoE arm (upcycled or from scratch, the study's optimizer treatment) other than the map's with
    the lowest mean loss at the largest budget of the main setting, once all of them have finished."""
    size, tpp = r.main["size"], float(r.main["tokens_per_param"])
    means = {}
    for a in r.arms:  # the MoE alternatives under the study's own optimizer treatment
        kind, decay = r.arms[a]["kind"], r.arms[a].get("decay", "budget")
        matched = kind == "upcycled" or (kind == "moe_scratch" and decay == "extra")  # the continued arms' decay
        if a in r.map_arms or not matched or r.arm_optimizer(a) != r.optimizer:
            continue
        runs = [job_dir(out, Job(size, tpp, a, s)) / "result.json" for s in range(r.seeds(a))]
        if not all(p.is_file() for p in runs):
            return None
        vals = [json.loads(p.read_text())["points"][-1]["val_loss"] for p in runs]
        means[a] = sum(vals) / len(vals)
    return min(means, key=means.get) if means else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- driver


def load_recipe_mapping(path: str | Path) -> dict:
    return yamlio.read_mapping(path, "recipe")


def is_regime_recipe(d: dict) -> bool:
    return isinstance(d, dict) and d.get("study") == "regime"


def tokens_per_param_steps(r: RegimeRecipe, non_embedding: int, tpp: float) -> int:
    """Optimizer steps of the dense pretraining up to a branch point of `tpp` tokens per parameter."""
    return max(1, math.ceil(tpp * non_embedding / (r.batch_size * r.seq_len)))


def copy_checkpoint(src: Path, dst: Path) -> None:
    """A checkpoint directory copied into place atomically (a kill leaves no half copy)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    tmp.replace(dst)


def save_state(out: str | Path, dest: str | Path) -> list[str]:
    """What a fresh machine needs to resume the study in `out` (copied to dest, atomically): the recipe,
    the tokenizer and the corpus fingerprint (the sequences are rebuilt from them, checked against the
    fingerprint), each branch point's checkpoint, every finished run's result and budget points, and an
    unfinished run's finished budgets and newest checkpoints. Returns the copied paths, relative to out."""
    from upcycle.train.checkpoint import checkpoints

    out, dest = Path(out), Path(dest)
    keep = ["recipe.json", "data/data.json"]
    keep += [str(p.relative_to(out)) for p in sorted((out / "data" / "tokenizer").glob("*"))]
    for p in sorted(out.glob("*/pretrain/branch-*/*")) + sorted(out.glob("*/pretrain/done.json")):
        keep.append(str(p.relative_to(out)))
    for run in sorted(out.glob("*/tpp-*/*/seed-*")):
        keep += [str(p.relative_to(out)) for p in sorted(run.glob("result.json")) + sorted(run.glob("budget-*.json"))]
        if not (run / "result.json").is_file():  # unfinished: its newest checkpoints, to go on from there
            for ckpts in sorted(run.glob("*/checkpoints")):
                steps = checkpoints(ckpts.parent)
                if steps:
                    keep += [str(p.relative_to(out)) for p in sorted(steps[-1].iterdir())]
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in keep:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / rel, tmp / rel)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.replace(dest)
    return keep
