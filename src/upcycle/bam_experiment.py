"""BAM's Table 1 in miniature (Zhang et al. 2024, arXiv 2408.08274): BTX vs BAM (KV experts) vs BAM
(KV shared), mixing a seed and three specialists, at matched data and at matched compute.

    upcycle bam-experiment recipes/bam-small.yaml --out results/bam-small     (~22 min on 2 CPU cores)
    upcycle bam-experiment recipes/bam-small.yaml --tiny --out /tmp/bam-smoke (smoke-test size, < 30 s)

    seed        a small parallel-attention dense model (transformers' Cohere: y = x + Attn(LN x) +
                MLP(LN x), SwiGLU, GQA, RoPE, tied embeddings) pretrained from scratch on the union of
                the domains (cosine schedule), with a byte-level BPE trained on the training documents
    branch      one copy per domain (`branch.with_general`: the domain's training sequences plus
                `general_share` of the union, BAM's 10%), peak LR = half the pretraining's, cosine
    mix         N = 1 + domains models (the seed is the general expert) mixed by `bam.mix` into
                  btx          averaged attention, FFN top-2 renormalised, alpha 0.01
                  bam          attention experts with their own K/V (soft router), FFN top-1 not
                               renormalised, alpha 0.01, beta 0.001
                  bam_shared   the same with K/V shared (the mean of the models' Wk, Wv)
                each trained on an equal mix of the domains for `mix_steps` steps at a constant LR after a
                short warmup (data matched, DM: the same tokens for every arm); compute matched (CM): a BAM
                arm evaluated at the step where its FLOPs equal BTX's total (constant LR: that point does
                not depend on the steps after it)
    evaluation  per-domain perplexity on held-out documents (the same sequences for every model), the
                training FLOPs per token (`train.flops_per_token`: attention experts and routers included),
                latency on one CPU thread: greedy generation with the KV cache (ms per new token) and one
                forward pass over seq_len tokens (ms)
    outputs     OUT/results.md, OUT/results.csv, OUT/bam.png, OUT/results.json; OUT/runs/<run>/ holds each
                training run (metrics.csv, summary.json, model/); finished runs are reused when run again
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upcycle import yamlio
from upcycle.errors import UpcycleError

HELP = "BAM vs BTX in miniature: seed, domain specialists, mixtures at matched data and compute"
MIXES = ("btx", "bam", "bam_shared")
LABELS = {"btx": "BTX", "bam": "BAM, KV experts", "bam_shared": "BAM, KV shared"}


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class BamRecipe:
    name: str = _f("bam", "name shown in the results")
    seed: int = _f(0, "seed of the split, data order, model and router initialisations")
    domains: dict = _f(None, "{name: data spec}: corpus:python|man|pypi[:MAX_CHARS] or a path")
    max_chars: int | None = _f(3_000_000, "characters per corpus domain (a seeded sample of documents)")
    val_fraction: float = _f(0.1, "share of each domain's documents held out")
    seq_len: int = _f(128, "tokens per sequence")
    batch_size: int = _f(16, "sequences per step")
    vocab_size: int = _f(4096, "byte-level BPE vocabulary trained on the training documents")
    model: dict = _f(None, "{hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads}")
    pretrain_steps: int = _f(800, "seed pretraining steps")
    pretrain_lr: float = _f(2e-3, "seed peak LR (warmup, cosine to 10%)")
    warmup: int = _f(20, "warmup steps of the seed, branches and mixtures")
    branch_steps: int = _f(300, "steps per specialist")
    branch_lr: float = _f(1e-3, "specialists' peak LR (cosine to 10%; BAM: half the pretraining's)")
    general_share: float = _f(0.1, "share of general (union) data in each specialist's training")
    mix_steps: int = _f(300, "mixture training steps (the data-matched budget)")
    mix_lr: float = _f(1e-3, "mixtures' LR, constant after warmup")
    mixes: tuple = _f(MIXES, "which mixtures")
    eval_batches: int = _f(8, "evaluation sequences per domain = eval_batches x batch_size")
    eval_every: int = _f(50, "mixtures' validation (equal-mix) every N steps")
    latency_prompt: int = _f(32, "prompt tokens of the generation latency")
    latency_new_tokens: int = _f(64, "greedy tokens generated for the latency")
    latency_repeats: int = _f(3, "timed repeats (median)")
    threads: int = _f(1, "torch CPU threads")
    tiny: dict | None = _f(None, "overrides applied by --tiny")

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
        d = yamlio.read_mapping(path, "recipe")
        yamlio.check_fields(cls, d, str(path), "recipe fields")
        if tiny:
            if not d.get("tiny"):
                raise UpcycleError(f"{path}: no `tiny:` overrides in this recipe")
            d = {**d, **d["tiny"]}
        for k in ("pretrain_lr", "branch_lr", "mix_lr", "general_share", "val_fraction"):
            if isinstance(d.get(k), str):
                d[k] = float(d[k])
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mixes"] = list(self.mixes)
        return d


def cohere_config(r: BamRecipe, vocab_size: int, eos: int):
    """The parallel-attention seed: transformers' Cohere block (one LayerNorm, attention and SwiGLU MLP
    side by side), GQA, RoPE, tied embeddings; logit_scale 1 (Cohere's 0.0625 is for its large models)."""
    from transformers import CohereConfig

    m = r.model
    return CohereConfig(
        vocab_size=vocab_size,
        hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_layers"],
        num_attention_heads=m["num_heads"],
        num_key_value_heads=m.get("num_kv_heads", m["num_heads"]),
        max_position_embeddings=r.seq_len,
        tie_word_embeddings=True,
        logit_scale=1.0,
        initializer_range=0.02,
        use_cache=False,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


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


class BamExperiment:
    def __init__(
        self, recipe: BamRecipe, out_dir: str | Path, progress: bool = True, log=print, command: str | None = None
    ):
        self.r, self.out, self.progress, self.log, self.command = recipe, Path(out_dir), progress, log, command
        self.runs = self.out / "runs"

    # ---------------------------------------------------------------- data
    def prepare(self) -> _Data:
        import torch

        from upcycle.branch import documents
        from upcycle.data import PackedData, pack_documents, split_documents
        from upcycle.experiment import train_bpe

        r = self.r
        self.out.mkdir(parents=True, exist_ok=True)
        saved = self.out / "recipe.json"
        if saved.is_file():
            old = json.loads(saved.read_text())
            diff = sorted(
                k
                for k in set(old) | set(r.to_dict())
                if k not in ("tiny", "mixes", "threads") and old.get(k) != r.to_dict().get(k)
            )
            if diff:
                raise UpcycleError(
                    f"{self.out} holds an experiment with a different recipe ({', '.join(diff)}); "
                    "pass --overwrite or another --out"
                )
        saved.write_text(json.dumps(r.to_dict(), indent=1) + "\n")
        t0 = time.perf_counter()
        docs = {}
        for name, spec in r.domains.items():
            if spec.startswith("corpus:") and spec.count(":") == 1 and r.max_chars:
                spec = f"{spec}:{r.max_chars}"
            docs[name] = documents(spec, r.seed)
        train_docs = [d for ds in docs.values() for d in split_documents(ds, r.val_fraction, r.seed)[0]]
        self.tokenizer = train_bpe(train_docs, r.vocab_size, self.out / "tokenizer")
        n_eval = r.eval_batches * r.batch_size
        domain = {}
        for name, ds in docs.items():
            p = pack_documents(ds, self.tokenizer, r.seq_len, r.val_fraction, r.seed, source=r.domains[name])
            if p.val.shape[0] == 0:
                raise UpcycleError(f"domain {name}: no validation sequences; raise val_fraction or max_chars")
            p.val = _spread(p.val, n_eval)
            domain[name] = p
        g = torch.Generator().manual_seed(r.seed)
        union_train = torch.cat([p.train for p in domain.values()])
        union_train = union_train[torch.randperm(union_train.shape[0], generator=g)]
        n_val = min(p.val.shape[0] for p in domain.values())
        val_eq = torch.cat([p.val[:n_val] for p in domain.values()])
        union = PackedData(
            union_train,
            val_eq,
            {"source": "union of " + ", ".join(domain), "train_sequences": int(union_train.shape[0])},
        )
        per = math.ceil(r.mix_steps * r.batch_size / len(domain))
        mix_train = torch.cat([_sample(p.train, per, r.seed + 11 + j) for j, p in enumerate(domain.values())])
        mix_train = mix_train[torch.randperm(mix_train.shape[0], generator=g)]
        mix = PackedData(
            mix_train,
            val_eq,
            {"source": "equal mix of " + ", ".join(domain), "train_sequences": int(mix_train.shape[0])},
        )
        self.info_data = {
            name: {
                "documents": p.info["documents"],
                "train_sequences": p.info["train_sequences"],
                "val_sequences": p.info["val_sequences"],
                "eval_sequences": int(p.val.shape[0]),
            }
            for name, p in domain.items()
        }
        sizes = ", ".join(f"{k} {v['train_sequences']} train seqs" for k, v in self.info_data.items())
        self.log(f"data: {sizes} of {r.seq_len} tokens ({time.perf_counter() - t0:.0f}s)")
        return _Data(domain, union, mix)

    def tconfig(self, steps: int, lr: float, min_lr: float, eval_every: int):
        from upcycle.train.config import TrainConfig

        r = self.r
        return TrainConfig(
            lr=lr,
            min_lr=min_lr,
            warmup=min(r.warmup, max(1, steps // 5)),
            steps=steps,
            batch_size=r.batch_size,
            seq_len=r.seq_len,
            eval_every=eval_every,
            eval_batches=r.eval_batches,
            checkpoint_every=0,
            keep_checkpoints=1,
            seed=r.seed,
            log_every=1,
        )

    def _train(self, name: str, model, data, config, stops: tuple[int, ...] = (), at_stop=None) -> dict:
        """One training run into runs/NAME (kept when it finished before: returns its summary)."""
        from upcycle.train.checkpoint import checkpoints
        from upcycle.train.loop import train

        d = self.runs / name
        if (d / "summary.json").is_file() and (d / "model").is_dir():
            self.log(f"{name}: finished before, reusing {d}")
            return json.loads((d / "summary.json").read_text())
        self.log(f"{name}: {config.steps} steps of {config.tokens_per_step():,} tokens")
        t0 = time.perf_counter()
        for stop in [s for s in stops if 0 < s < config.steps] + [None]:
            resume = bool(d.exists() and checkpoints(d))
            train(
                model,
                data,
                config,
                d,
                resume=resume,
                overwrite=not resume,
                tokenizer=self.tokenizer,
                progress=self.progress,
                stop_at=stop,
            )
            if stop is not None and at_stop is not None:
                at_stop(stop, model)
        s = json.loads((d / "summary.json").read_text())
        s["wall_s"] = time.perf_counter() - t0
        (d / "summary.json").write_text(json.dumps(s, indent=1) + "\n")
        return s

    def ppl(self, model, data: _Data) -> dict[str, float]:
        from upcycle.train.config import TrainConfig
        from upcycle.train.dist import devices
        from upcycle.train.loop import evaluate_loss

        device, autocast = devices(TrainConfig(seq_len=self.r.seq_len), 0)
        model.to(device)
        out = {}
        for name, p in data.domain.items():
            loss = evaluate_loss(model, p.val, self.r.batch_size, self.r.eval_batches, device, autocast)
            out[name] = math.exp(loss)
        return out

    # ---------------------------------------------------------------- stages
    def run(self) -> dict:
        import torch
        from transformers import AutoModelForCausalLM

        from upcycle.branch import with_general
        from upcycle.experiment import machine
        from upcycle.formats.load import load, load_dense
        from upcycle.methods.bam import BamPlan, mix
        from upcycle.train.flops import active_params, flops_per_token

        r = self.r
        torch.set_num_threads(r.threads)
        t_start = time.perf_counter()
        data = self.prepare()
        evals_f = self.out / "evals.json"
        evals: dict = json.loads(evals_f.read_text()) if evals_f.is_file() else {}

        def record(key: str, value: dict) -> None:
            evals[key] = value
            evals_f.write_text(json.dumps(evals, indent=1) + "\n")

        # seed
        torch.manual_seed(r.seed)
        cfg = cohere_config(r, len(self.tokenizer), self.tokenizer.eos_token_id)
        seed_model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        s = self._train(
            "seed", seed_model, data.union, self.tconfig(r.pretrain_steps, r.pretrain_lr, r.pretrain_lr / 10, 0)
        )
        seed_dir = self.runs / "seed" / "model"
        if "seed" not in evals:
            record(
                "seed",
                {
                    "ppl": self.ppl(load_dense(seed_dir), data),
                    "steps": s["steps"],
                    "tokens": s["tokens"],
                    "flops": s["flops"],
                },
            )
        # specialists
        dirs = [seed_dir]
        for name, p in data.domain.items():
            run = f"expert_{name}"
            s = self._train(
                run,
                load_dense(seed_dir),
                with_general(p, data.union, r.general_share, r.seed),
                self.tconfig(r.branch_steps, r.branch_lr, r.branch_lr / 10, 0),
            )
            dirs.append(self.runs / run / "model")
            if run not in evals:
                record(
                    run,
                    {
                        "ppl": self.ppl(load_dense(dirs[-1]), data),
                        "steps": s["steps"],
                        "tokens": s["tokens"],
                        "flops": s["flops"],
                    },
                )
        # mixtures
        N = len(dirs)
        plans = {
            "btx": BamPlan.for_method("btx", N, seed=r.seed),
            "bam": BamPlan.for_method("bam", N, seed=r.seed),
            "bam_shared": BamPlan.for_method("bam", N, kv="shared", seed=r.seed),
        }
        order = ["btx"] + [m for m in r.mixes if m != "btx"]  # BTX first: its FLOPs set the compute match
        fpt: dict[str, int] = {}
        btx_flops = None
        for m in order:
            if m not in r.mixes and m == "btx":
                continue
            dense = [load_dense(d) for d in dirs]
            model = mix(dense, plans[m], [str(d) for d in dirs], log=self.log)
            del dense
            fpt[m] = flops_per_token(model, r.seq_len)
            tps = r.batch_size * r.seq_len
            cm_step = None
            if m != "btx" and btx_flops is not None:
                cm_step = max(1, min(r.mix_steps, round(btx_flops / (fpt[m] * tps))))

            def at_stop(step, mdl, m=m):
                record(
                    f"{m}_cm",
                    {"ppl": self.ppl(mdl, data), "steps": step, "tokens": step * tps, "flops": step * tps * fpt[m]},
                )
                mdl.train()

            key = f"{m}_dm" if m != "btx" else "btx"
            if key in evals and (self.runs / m / "summary.json").is_file():
                s = json.loads((self.runs / m / "summary.json").read_text())
            else:
                s = self._train(
                    m,
                    model,
                    data.mix,
                    self.tconfig(r.mix_steps, r.mix_lr, r.mix_lr, r.eval_every),
                    stops=(cm_step,) if cm_step else (),
                    at_stop=at_stop,
                )
                record(
                    key,
                    {
                        "ppl": self.ppl(load(self.runs / m / "model"), data),
                        "steps": s["steps"],
                        "tokens": s["tokens"],
                        "flops": s["flops"],
                    },
                )
            if m == "btx":
                btx_flops = s["flops"]
            if cm_step is not None and cm_step >= r.mix_steps and f"{m}_cm" not in evals:
                record(f"{m}_cm", dict(evals[key]))  # cheaper than BTX per token: its CM point is its last
        # costs
        costs = {}
        vocab = len(self.tokenizer)
        for key, path, loader in [("dense", seed_dir, load_dense)] + [
            (m, self.runs / m / "model", load) for m in order if m in r.mixes
        ]:
            model = loader(path)
            gen, fwd = latency(model, vocab, r.latency_prompt, r.latency_new_tokens, r.seq_len, r.latency_repeats)
            costs[key] = {
                "flops_per_token": flops_per_token(model, r.seq_len),
                "active_params": active_params(model),
                "total_params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
                "ms_per_token_generate": gen,
                "ms_per_forward": fwd,
            }
        info = {
            "recipe": r.to_dict(),
            "machine": machine(),
            "data": self.info_data,
            "num_experts": N,
            "command": self.command,
            "wall_s": time.perf_counter() - t_start,
            "costs": costs,
            "btx_flops": btx_flops,
            "tokenizer": f"byte-level BPE, {vocab} tokens",
        }
        rows = self.rows(evals, costs)
        curves = {m: _curve(self.runs / m / "metrics.csv") for m in r.mixes}
        self.write(rows, curves, info)
        return {"rows": rows, "curves": curves, "info": info}

    def rows(self, evals: dict, costs: dict) -> list[dict]:
        names = list(self.r.domains)
        out = []

        def row(model: str, kind: str, e: dict, cost_key: str | None):
            ppl = e["ppl"]
            d = {"model": model, "kind": kind, "steps": e["steps"], "tokens": e["tokens"], "train_flops": e["flops"]}
            d.update({f"ppl_{n}": ppl[n] for n in names})
            d["ppl_avg"] = sum(ppl[n] for n in names) / len(names)
            c = costs.get(cost_key, {}) if cost_key else {}
            for k in ("flops_per_token", "active_params", "total_params", "ms_per_token_generate", "ms_per_forward"):
                d[k] = c.get(k)
            out.append(d)

        row("seed", "dense", evals["seed"], "dense")
        for n in names:
            row(f"{n} expert", "dense", evals[f"expert_{n}"], "dense")
        if "btx" in evals:
            row("BTX", "mixture", evals["btx"], "btx")
        for m in ("bam", "bam_shared"):
            for tag in ("dm", "cm"):
                if f"{m}_{tag}" in evals:
                    row(f"{LABELS[m]} ({tag.upper()})", "mixture", evals[f"{m}_{tag}"], m)
        return out

    def write(self, rows: list[dict], curves: dict, info: dict) -> None:
        with open(self.out / "results.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        (self.out / "results.json").write_text(json.dumps({"rows": rows, "info": info}, indent=1) + "\n")
        (self.out / "results.md").write_text(results_markdown(rows, info))
        plot(rows, curves, info, self.out / "bam.png")


def _curve(path: Path) -> list[tuple[float, float]]:
    if not path.is_file():
        return []
    with open(path) as fh:
        return [(float(x["flops"]), float(x["val_loss"])) for x in csv.DictReader(fh) if x.get("val_loss")]


def results_markdown(rows: list[dict], info: dict) -> str:
    r, m = info["recipe"], info["machine"]
    names = list(r["domains"])
    mm = r["model"]
    lines = [
        f"# {r['name']}: BAM vs BTX, per-domain perplexity",
        "",
        f"Seed: transformers' Cohere block (parallel attention: y = x + Attn(LN x) + MLP(LN x)), "
        f"d={mm['hidden_size']}, d_ff={mm['intermediate_size']}, {mm['num_layers']} layers, {mm['num_heads']} "
        f"heads / {mm.get('num_kv_heads', mm['num_heads'])} KV heads, {info['tokenizer']}, tied embeddings, "
        f"pretrained from scratch for {r['pretrain_steps']} steps of {r['batch_size']} x {r['seq_len']} tokens "
        f"on the union of the domains.",
        f"Specialists: {r['branch_steps']} steps each on their domain with {r['general_share']:.0%} of the "
        f"union mixed in. Mixtures (N = {info['num_experts']}: the seed + {len(names)} specialists): "
        f"{r['mix_steps']} steps on an equal mix of the domains, constant LR {r['mix_lr']} after warmup. "
        "DM = data matched (same tokens as BTX); CM = compute matched (the step where the arm's training "
        "FLOPs reach BTX's total).",
        "Domains: "
        + ", ".join(
            f"`{k}` = {v} ({info['data'][k]['train_sequences']:,} train sequences, "
            f"{info['data'][k]['eval_sequences']} held-out sequences evaluated)"
            for k, v in r["domains"].items()
        )
        + ".",
        f"Machine: {m['cpu']}, {m['cores']} cores, {r['threads']} torch thread(s), shared with other jobs "
        f"(load average {m.get('load_average_1min', '?')} at the end), torch {m['torch']}; the whole "
        f"experiment took {info['wall_s'] / 60:.1f} min.",
        "",
    ]
    if info.get("command"):
        lines += [f"Command: `{info['command']}`", ""]
    lines += [
        "## Perplexity on held-out documents (lower is better)",
        "",
        "| model | " + " | ".join(names) + " | average | steps | training FLOPs |",
        "|" + "---|" * (len(names) + 4),
    ]
    mixtures = [x for x in rows if x["kind"] == "mixture"]
    best = min(x["ppl_avg"] for x in mixtures) if mixtures else None
    for x in rows:
        avg = f"{x['ppl_avg']:.2f}"
        if x["kind"] == "mixture" and x["ppl_avg"] == best:
            avg = f"**{avg}**"
        lines.append(
            f"| {x['model']} | "
            + " | ".join(f"{x['ppl_' + n]:.2f}" for n in names)
            + f" | {avg} | {x['steps']} | {x['train_flops']:.3g} |"
        )
    lines += ["", "Seed and specialists: steps and FLOPs of their own training (the seed's pretraining for the seed)."]
    lines += _findings(rows)
    lines += [
        "",
        "## Cost per token",
        "",
        "| model | total params | active params | training FLOPs / token | forward FLOPs / token | "
        "greedy generation, KV cache (ms / token) | forward of "
        f"{r['seq_len']} tokens (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {"dense": "dense (seed, each specialist)", **LABELS}
    for k, c in info["costs"].items():
        lines.append(
            f"| {labels[k]} | {c['total_params']:,} | {c['active_params']:,} | {c['flops_per_token']:,} | "
            f"{c['flops_per_token'] / 3:,.0f} | {c['ms_per_token_generate']:.2f} | {c['ms_per_forward']:.1f} |"
        )
    lines += [
        "",
        "FLOPs: `upcycle.train.flops_per_token` (6 x active parameters + 12 x layers x attention width x "
        "seq_len, forward + backward; FFN experts counted top-k times, every attention expert counted (soft "
        "routing), routers included; forward = one third). Latency: batch 1, "
        f"{r['latency_prompt']}-token prompt, {r['latency_new_tokens']} greedy tokens, median of "
        f"{r['latency_repeats']}, on a shared CPU (indicative only).",
        "",
    ]
    return "\n".join(lines)


def _findings(rows: list[dict]) -> list[str]:
    """The paper's claims checked against this run's numbers (BAM < BTX on average perplexity; KV sharing
    between the two), one line each."""
    by = {x["model"]: x["ppl_avg"] for x in rows}
    btx = by.get("BTX")
    if btx is None:
        return []
    out = ["", "## The paper's finding, checked", ""]
    for name in ("BAM, KV experts (DM)", "BAM, KV experts (CM)", "BAM, KV shared (DM)", "BAM, KV shared (CM)"):
        if name in by:
            d = 100 * (by[name] - btx) / btx
            out.append(
                f"- {name}: average perplexity {by[name]:.2f} vs BTX {btx:.2f} "
                f"({d:+.1f}%: BAM {'<' if by[name] < btx else '>='} BTX)"
            )
    for tag in ("DM", "CM"):
        e, s = by.get(f"BAM, KV experts ({tag})"), by.get(f"BAM, KV shared ({tag})")
        if e is not None and s is not None:
            between = min(e, btx) <= s <= max(e, btx)
            out.append(
                f"- {tag}: KV shared {s:.2f} is {'between' if between else 'not between'} KV experts {e:.2f} "
                f"and BTX {btx:.2f}"
            )
    return out


def plot(rows: list[dict], curves: dict, info: dict, out_png: Path) -> Path:
    """Left: the mixtures' equal-mix validation loss vs training FLOPs (BTX's total marked: the compute
    match). Right: per-domain perplexity of every model."""
    from upcycle.plots import PALETTE, _plt, _save

    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 5.6), gridspec_kw={"width_ratios": [1, 1.3]})
    colours = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(MIXES)}
    for m, pts in curves.items():
        if pts:
            ax.plot(
                [x for x, _ in pts],
                [y for _, y in pts],
                "-o",
                ms=3,
                color=colours[m],
                lw=1.6,
                label=f"{LABELS[m]}  ({pts[-1][1]:.3f})",
            )
    if info.get("btx_flops"):
        ax.axvline(info["btx_flops"], color="0.5", ls=":", lw=1.0)
        ax.annotate(
            "BTX's compute (CM)",
            (info["btx_flops"], 0.97),
            xycoords=("data", "axes fraction"),
            rotation=90,
            ha="right",
            va="top",
            fontsize=9,
            color="0.35",
            xytext=(-3, 0),
            textcoords="offset points",
        )
    ax.set_xlabel("mixture training FLOPs")
    ax.set_ylabel("validation loss (equal mix of the domains)")
    ax.set_title(f"{info['recipe']['name']}: mixture training", loc="left", fontweight="bold")
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False, fontsize=9)
    names = list(info["recipe"]["domains"]) + ["avg"]
    n = len(rows)
    width = 0.8 / n
    for i, x in enumerate(rows):
        vals = [x[f"ppl_{d}"] for d in names]
        c = "0.35" if x["model"] == "seed" else ("0.7" if x["kind"] == "dense" else PALETTE[(i + 1) % len(PALETTE)])
        ax2.bar(
            [j + (i - n / 2 + 0.5) * width for j in range(len(names))],
            vals,
            width,
            color=c,
            edgecolor="white",
            lw=0.5,
            label=x["model"],
            hatch="//" if "(CM)" in x["model"] else None,
        )
    ax2.set_xticks(range(len(names)), names)
    ax2.set_yscale("log")
    ax2.set_ylabel("perplexity (log scale)")
    ax2.set_title("per-domain perplexity on held-out documents", loc="left", fontweight="bold")
    ax2.grid(True, axis="y", alpha=0.3)
    ax2.legend(frameon=False, fontsize=8, ncol=2)
    fig.tight_layout()
    return _save(fig, out_png)


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="experiment recipe (YAML; see recipes/bam-small.yaml)")
    p.add_argument("--out", type=Path, help="output directory (default: runs/<recipe name>[-tiny])")
    p.add_argument("--tiny", action="store_true", help="apply the recipe's `tiny:` overrides (a smoke test)")
    p.add_argument("--overwrite", action="store_true", help="delete OUT first instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import shutil

    import torch

    recipe = BamRecipe.from_yaml(args.recipe, tiny=args.tiny)
    out = args.out or Path("runs") / (args.recipe.stem + ("-tiny" if args.tiny else ""))
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    command = f"upcycle bam-experiment {args.recipe}" + (" --tiny" if args.tiny else "") + f" --out {out}"
    threads = torch.get_num_threads()
    try:
        res = BamExperiment(recipe, out, not args.quiet, lambda m: print(m, file=sys.stderr), command).run()
    finally:
        torch.set_num_threads(threads)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.md, results.csv, bam.png ({res['info']['wall_s'] / 60:.1f} min)")
    return 0
