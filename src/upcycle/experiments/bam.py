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
                training run (metrics.csv, summary.json, model/); finished runs are reused when run again"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

from upcycle.errors import UpcycleError
from upcycle.experiments.bam_recipe import LABELS, BamRecipe, _Data, _sample, _spread, cohere_config, latency
from upcycle.experiments.bam_report import _curve, plot, results_markdown
from upcycle.experiments.common import keep_recipe


class BamExperiment:
    def __init__(
        self, recipe: BamRecipe, out_dir: str | Path, progress: bool = True, log=print, command: str | None = None
    ):
        self.r, self.out, self.progress, self.log, self.command = recipe, Path(out_dir), progress, log, command
        self.runs = self.out / "runs"

    # ---------------------------------------------------------------- data
    def prepare(self) -> _Data:
        import torch

        from upcycle.data.documents import split_documents
        from upcycle.data.tokens import PackedData, pack_documents
        from upcycle.experiments.common import train_bpe
        from upcycle.train.branch import documents

        r = self.r
        self.out.mkdir(parents=True, exist_ok=True)
        keep_recipe(self.out, r, free=("tiny", "mixes", "threads"))
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

        from upcycle.experiments.common import machine
        from upcycle.formats.load import load, load_dense
        from upcycle.methods.bam import BamPlan, mix
        from upcycle.train.branch import with_general
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
