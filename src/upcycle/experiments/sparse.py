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
            with a summary.json are skipped when the experiment is run again (resume)"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from pathlib import Path

from upcycle.errors import UpcycleError
from upcycle.experiments.common import (
    budget_steps,
    cumulative_time,
    dense_config,
    keep_recipe,
    machine,
    read_rows,
    split_seen,
    train_bpe,
)
from upcycle.experiments.recipe import Recipe
from upcycle.experiments.sparse_report import plot, results_markdown


class Experiment:
    def __init__(
        self, recipe: Recipe, out_dir: str | Path, progress: bool = True, log=print, command: str | None = None
    ):
        self.r, self.out, self.progress, self.log, self.command = recipe, Path(out_dir), progress, log, command

    # -- setup
    def prepare(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from upcycle.data.corpora import CORPORA, corpus_documents
        from upcycle.data.documents import read_documents, split_documents
        from upcycle.data.tokens import pack_documents
        from upcycle.hub import default_model_dir

        r = self.r
        self.out.mkdir(parents=True, exist_ok=True)
        keep_recipe(self.out, r, free=("arms", "tiny"))  # arms may be added or dropped
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
            return read_rows(d / "metrics.csv"), json.loads((d / "summary.json").read_text()), vals
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

        from upcycle.methods.baselines import moe_from_scratch
        from upcycle.methods.surgery import upcycle
        from upcycle.methods.tiling import depth_tile
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

            cont_data = split_seen(self.data, r, pretrain_steps)
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
                for x in read_rows(self.out / "pretrain" / "metrics.csv")
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
            times = cumulative_time(rows)
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
