"""The runs of the regime study (see `upcycle.experiments.regime`): data, the dense pretraining with its branch
points, and one (arm, seed) from a branch point with its decay branches. Each function runs in a worker
process and reads everything it needs from the study's directory."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from upcycle.errors import UpcycleError
from upcycle.experiments.regime_recipe import (
    Job,
    RegimeRecipe,
    copy_checkpoint,
    job_dir,
    sha256_file,
    tokens_per_param_steps,
)

# ----------------------------------------------------------------------------------------------- data


def prepare_data(r: RegimeRecipe, out: Path, log=print) -> None:
    """OUT/data: the BPE tokenizer (trained on the training documents) and the packed sequences (train,
    and the fixed evaluation set), made once and read by every run."""
    from upcycle.data.corpora import CORPORA, corpus_documents, corpus_fingerprint
    from upcycle.data.documents import read_documents, split_documents
    from upcycle.data.tokens import pack_documents
    from upcycle.experiments.common import train_bpe

    d = out / "data"
    if (d / "sequences.pt").is_file():
        return
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if r.corpus in CORPORA:
        docs = corpus_documents(r.corpus, r.max_chars, 0)
    else:  # your own text: a file, a folder of text files or a .jsonl file
        docs = read_documents(r.corpus)
    train_docs, _ = split_documents(docs, r.val_fraction, 0)
    tok = train_bpe(train_docs, r.vocab_size, d / "tokenizer")
    packed = pack_documents(docs, tok, r.seq_len, r.val_fraction, 0, source=f"corpus:{r.corpus}")
    val = packed.val
    if val.shape[0] > r.eval_sequences:  # evenly spaced, so a small set covers every held-out document
        val = val[torch.linspace(0, val.shape[0] - 1, r.eval_sequences).round().long()]
    info = dict(
        packed.info,
        eval_sequences=int(val.shape[0]),
        fingerprint=corpus_fingerprint(r.corpus, docs),
        vocab_size=len(tok),
        eos=tok.eos_token_id,
        train_tokens=int(packed.train.numel()),
    )
    if (d / "data.json").is_file():  # a study resumed on another machine: the same text, or refuse
        before = json.loads((d / "data.json").read_text())
        keys = ("sha256", "documents", "chars")
        if {k: before["fingerprint"][k] for k in keys} != {k: info["fingerprint"][k] for k in keys} or (
            before["train_sequences"] != info["train_sequences"]
        ):
            raise UpcycleError(
                f"{d}: this machine's corpus {r.corpus!r} ({info['fingerprint']['versions']}) differs from the "
                f"one the study started with ({before['fingerprint']['versions']}); install the same versions "
                "or start the study in another --out"
            )
    dtype = torch.int16 if len(tok) < 2**15 else torch.int32
    tmp = d / ".sequences.pt.tmp"
    torch.save({"train": packed.train.to(dtype), "val": val.to(dtype)}, tmp)
    (d / "data.json").write_text(json.dumps(info, indent=1) + "\n")
    tmp.replace(d / "sequences.pt")
    log(
        f"data: {packed.info['train_sequences']:,} train sequences ({info['train_tokens'] / 1e6:.1f}M tokens), "
        f"{val.shape[0]} evaluation sequences, {len(docs)} documents ({time.perf_counter() - t0:.0f}s)"
    )


def load_data(out: Path):
    from upcycle.data.tokens import PackedData

    saved = torch.load(out / "data" / "sequences.pt", weights_only=True, map_location="cpu")
    info = json.loads((out / "data" / "data.json").read_text())
    return PackedData(saved["train"].long(), saved["val"].long(), info)


# --------------------------------------------------------------------------------------------- models


def size_config(r: RegimeRecipe, size: str, info: dict):
    from upcycle.experiments.common import dense_config

    return dense_config(SimpleNamespace(model=r.sizes[size], seq_len=r.seq_len), info["vocab_size"], info["eos"])


def non_embedding_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def _dense(config, seed: int):
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def _load_weights(model, path: Path):
    from upcycle.train.checkpoint import load_model_weights

    load_model_weights(model, path)
    return model


def widen(model, layers, width: int, seed: int):
    """The positive control's shape: the MLPs of `layers` replaced by fresh ones `width` wide."""
    import copy

    from upcycle.adapters import adapter_for

    adapter = adapter_for(model.config)
    cfg = copy.deepcopy(model.config)
    cfg.intermediate_size = width
    blocks = adapter.layer_list(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 17)
        for i in layers:
            old = getattr(blocks[i], adapter.mlp)
            new = type(old)(cfg)
            for p in new.parameters():
                torch.nn.init.normal_(p, 0.0, model.config.initializer_range)
            setattr(blocks[i], adapter.mlp, new)
    return model


def build_arm(r: RegimeRecipe, arm: str, seed: int, config, branch: Path):
    """(model, the dense model it started from or None, plan or None) of an arm at its first step."""
    from upcycle.methods.baselines import moe_from_scratch
    from upcycle.methods.layers import select_layers
    from upcycle.methods.surgery import upcycle

    kind = r.arms[arm]["kind"]
    if kind == "dense":
        return _load_weights(_dense(config, 0), branch / "model.safetensors"), None
    if kind == "upcycled":
        plan = r.arm_plan(arm).replace(seed=seed)
        dense = _load_weights(_dense(config, 0), branch / "model.safetensors")
        return upcycle(dense, plan, inplace=True), plan
    if kind == "moe_scratch":
        plan = r.arm_plan(arm).replace(seed=seed)
        return moe_from_scratch(config, plan, seed=1000 + seed), plan
    plan = r.arm_plan(arm)
    model = _dense(config, 1000 + seed)
    layers = select_layers(plan.layers, config.num_hidden_layers)
    return widen(model, layers, plan.num_experts * config.intermediate_size, 1000 + seed), None


# ------------------------------------------------------------------------------------------- training


def train_config(
    r: RegimeRecipe, steps: int, warmup: int, seed: int, every: int, ckpt: int, decay_fraction: float | None = None
):
    from upcycle.train.config import TrainConfig

    return TrainConfig(
        lr=r.lr,
        min_lr=r.lr * r.final_lr_ratio,
        warmup=min(warmup, steps),
        schedule="wsd",
        decay_fraction=r.decay_fraction if decay_fraction is None else decay_fraction,
        steps=steps,
        batch_size=r.batch_size,
        seq_len=r.seq_len,
        clip=r.clip,
        weight_decay=r.weight_decay,
        eval_every=every,
        eval_batches=math.ceil(r.eval_sequences / r.batch_size),
        checkpoint_every=ckpt,
        keep_checkpoints=1,
        seed=seed,
        log_every=1,
    )


def _advance(model, data, cfg, d: Path, stop_at: int | None, progress: bool, init_opt=None) -> list[dict]:
    """Train the run in d up to stop_at (None: to its end), resuming it from its newest checkpoint."""
    from upcycle.train.checkpoint import checkpoints
    from upcycle.train.loop import train

    ck = checkpoints(d)
    return train(
        model,
        data,
        cfg,
        d,
        resume=bool(ck),
        overwrite=not ck,
        init_optimizer_state=None if ck else init_opt,
        progress=progress,
        save_model=False,
        stop_at=stop_at,
    )


def run_pretrain(r: RegimeRecipe, out: Path, job: Job, data, progress: bool) -> str:
    """The dense phase of one size: warmup, then the stable LR, stopped at each branch point, whose
    checkpoint is copied to OUT/<size>/pretrain/branch-<N> with branch.json (tokens, FLOPs, loss)."""
    from upcycle.train.checkpoint import checkpoints
    from upcycle.train.flops import flops_per_token
    from upcycle.train.loop import evaluate_loss

    d = job_dir(out, job)
    config = size_config(r, job.size, data.info)
    model = _dense(config, r.pretrain_seed)
    P = non_embedding_params(model)
    fpt = flops_per_token(model, r.seq_len)
    stops = {tpp: tokens_per_param_steps(r, P, tpp) for tpp in r.branch_points(job.size)}
    last = max(stops.values())
    total = math.ceil(last / (1 - r.decay_fraction)) + 2  # a wsd run whose decay starts after the last stop
    cfg = train_config(r, total, r.warmup, r.pretrain_seed, max(1, round(last / 40)), max(1, round(last / 10)))
    assert cfg.decay_start(total) > last
    need = last * r.batch_size
    if need > data.train.shape[0]:
        raise UpcycleError(
            f"{job.name}: the pretraining reads {need:,} sequences but the corpus has "
            f"{data.train.shape[0]:,}; use a smaller model or fewer tokens per parameter"
        )
    for tpp, k in sorted(stops.items()):
        b = d / f"branch-{tpp:g}"
        if (b / "branch.json").is_file():
            continue
        rows = _advance(model, data, cfg, d / "run", k, progress)
        ck = checkpoints(d / "run")[-1]
        copy_checkpoint(ck, b)
        val = float(evaluate_loss(model, data.val, r.batch_size, cfg.eval_batches, next(model.parameters()).device))
        (b / "branch.json").write_text(
            json.dumps(
                {
                    "tokens_per_param": tpp,
                    "steps": k,
                    "tokens": k * r.batch_size * r.seq_len,
                    "flops": rows[-1]["flops"] if rows else k * r.batch_size * r.seq_len * fpt,
                    "flops_per_token": fpt,
                    "non_embedding_params": P,
                    "val_loss": val,
                    "model_sha256": sha256_file(b / "model.safetensors"),
                },
                indent=1,
            )
            + "\n"
        )
    shutil.rmtree(d / "run" / "checkpoints", ignore_errors=True)
    (d / "done.json").write_text(
        json.dumps({"non_embedding_params": P, "flops_per_token": fpt, "branch_points": sorted(stops)}, indent=1) + "\n"
    )
    return f"{P:,} non-embedding parameters, branch points at {sorted(stops)} tokens/parameter"


def arm_data(r: RegimeRecipe, data, branch_steps: int, seed: int, scratch_sequences: int | None):
    """The continued arms' sequences (those the pretraining did not read), or (scratch_sequences: how
    many of those the dense arm reads) the pretraining's sequences followed by the dense arm's."""
    from upcycle.data.tokens import Batches, PackedData

    perm = Batches(data.train, r.batch_size, r.pretrain_seed).permutation(0)
    consumed = branch_steps * r.batch_size
    pool = data.train[perm[consumed:]]
    if scratch_sequences is None:
        return PackedData(pool, data.val, dict(data.info, continuation_sequences=int(pool.shape[0])))
    cont = Batches(pool, r.batch_size, seed).permutation(0)[:scratch_sequences]
    seqs = torch.cat([data.train[perm[:consumed]], pool[cont]])
    return PackedData(seqs, data.val, dict(data.info, scratch_sequences=int(seqs.shape[0])))


def run_arm(r: RegimeRecipe, out: Path, job: Job, data, progress: bool) -> str:
    from upcycle.train.checkpoint import checkpoints
    from upcycle.train.flops import flops_per_token
    from upcycle.train.loop import evaluate_loss, train
    from upcycle.train.optim import carry_over_optimizer_state

    t0 = time.perf_counter()
    d = job_dir(out, job)
    branch = out / job.size / "pretrain" / f"branch-{job.tpp:g}"
    binfo = json.loads((branch / "branch.json").read_text())
    config = size_config(r, job.size, data.info)
    kind = r.arms[job.arm]["kind"]
    model, plan = build_arm(r, job.arm, job.seed, config, branch)
    fpt = flops_per_token(model, r.seq_len)
    tps = r.batch_size * r.seq_len
    B, fpt_dense = float(binfo["flops"]), binfo["flops_per_token"]
    dense_steps = {x: max(1, round(x * B / (fpt_dense * tps))) for x in r.extra}
    if kind in ("dense", "upcycled"):
        targets = {x: x * B for x in r.extra}
        steps = {x: max(1, round(t / (fpt * tps))) for x, t in targets.items()}
        warm = max(1, round(r.rewarm * B / (fpt * tps)))
        arm_d = arm_data(r, data, binfo["steps"], job.seed, None)
    elif kind == "moe_scratch":
        targets = {x: (1 + x) * B for x in r.extra}
        steps = {x: max(1, round(t / (fpt * tps))) for x, t in targets.items()}
        warm = r.warmup
        arm_d = arm_data(r, data, binfo["steps"], job.seed, max(0, max(steps.values()) - binfo["steps"]) * r.batch_size)
    else:  # the positive control: the dense arm's tokens
        steps = {x: binfo["steps"] + dense_steps[x] for x in r.extra}
        targets = {x: s * tps * fpt for x, s in steps.items()}
        warm = r.warmup
        arm_d = arm_data(r, data, binfo["steps"], job.seed, dense_steps[max(r.extra)] * r.batch_size)
    S = max(steps.values())
    if S * r.batch_size > arm_d.train.shape[0]:
        raise UpcycleError(
            f"{job.name}: {S * r.batch_size:,} sequences needed, {arm_d.train.shape[0]:,} unread; "
            "the study repeats no data: use fewer tokens per parameter or a larger corpus"
        )
    every = max(1, round(r.eval_every * B / (fpt * tps)))
    # a scratch arm with `decay: extra` decays over the FLOPs the continued arms decay over (the last
    # decay_fraction of the extra), not over the last decay_fraction of its whole run
    short = kind in ("moe_scratch", "dense_wide_scratch") and r.arms[job.arm].get("decay", "budget") == "extra"
    cfgs = {
        x: train_config(
            r,
            s,
            warm,
            job.seed,
            every,
            max(1, round(r.checkpoint_every * S)),
            decay_fraction=r.decay_fraction * x / (1 + x) if short else None,
        )
        for x, s in steps.items()
    }
    init_opt = None
    if r.arm_optimizer(job.arm) == "carry" and kind in ("dense", "upcycled"):
        dense_opt = torch.load(branch / "optimizer.pt", weights_only=True, map_location="cpu")
        if kind == "dense":
            init_opt = dense_opt
        else:
            dense = _load_weights(_dense(config, 0), branch / "model.safetensors")
            init_opt = carry_over_optimizer_state(dense_opt, dense, model, plan)
    start = float(
        evaluate_loss(model, arm_d.val, r.batch_size, cfgs[max(r.extra)].eval_batches, next(model.parameters()).device)
    )
    stable = d / "stable"
    points = []
    for x in r.extra:
        f = d / f"budget-{x:g}.json"
        if not f.is_file():
            cfg = cfgs[x]
            if x == max(r.extra):
                rows = _advance(model, arm_d, cfg, stable, None, progress, init_opt)
            else:
                k = cfg.decay_start(cfg.steps)
                _advance(model, arm_d, cfgs[max(r.extra)], stable, k, progress, init_opt)
                bd = d / f"branch-{x:g}"
                ck = checkpoints(bd) or checkpoints(stable)
                rows = train(
                    model, arm_d, cfg, bd, resume=ck[-1], progress=progress, save_model=False, accept_changes=True
                )
                shutil.rmtree(bd / "checkpoints", ignore_errors=True)
            last = rows[-1]
            extra = last["flops"] - (B if kind != "dense" and kind != "upcycled" else 0.0)
            f.write_text(
                json.dumps(
                    {
                        "extra": x,
                        "steps": int(last["step"]),
                        "tokens": int(last["tokens"]),
                        "flops": float(last["flops"]),
                        "extra_flops": float(extra),
                        "target_flops": float(targets[x]),
                        "val_loss": float(last["val_loss"]),
                    }
                )
                + "\n"
            )
        points.append(json.loads(f.read_text()))
    shutil.rmtree(stable / "checkpoints", ignore_errors=True)
    from upcycle.eval.plots import read_metrics

    cols = read_metrics(stable / "metrics.csv")
    keep = [i for i, v in enumerate(cols["val_loss"]) if v is not None]
    curve = {
        k: [cols[k][i] for i in keep]
        for k in ("step", "tokens", "flops", "val_loss", "router_entropy", "expert_load_max_over_mean", "lr")
        if k in cols
    }
    res = {
        "size": job.size,
        "tokens_per_param": job.tpp,
        "arm": job.arm,
        "kind": kind,
        "seed": job.seed,
        "optimizer": r.arm_optimizer(job.arm),
        "flops_per_token": fpt,
        "B_flops": B,
        "branch_sha256": binfo["model_sha256"],
        "start_val_loss": start,
        "warmup_steps": warm,
        "points": points,
        "curve": curve,
        "wall_s": time.perf_counter() - t0,
        "plan": plan.to_dict() if plan is not None else None,
        "machine": run_machine(),
    }
    tmp = d / ".result.json.tmp"
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(d / "result.json")
    return " ".join(f"+{p['extra']:.0%}: {p['val_loss']:.4f}" for p in points)


def run_machine() -> dict:
    """What a run ran on, kept with its result: a study resumed across stops may span machines, and the report
    is made wherever it is published."""
    from upcycle.experiments.common import machine

    m = machine()
    return {k: m[k] for k in ("cpu", "cores", "torch", "threads")}


def run_job(r: RegimeRecipe, out: str, job: Job, progress: bool = False) -> str:
    """A worker's entry point: one job, with the recipe's thread count."""
    torch.set_num_threads(r.threads)
    out = Path(out)
    data = load_data(out)
    if job.arm is None:
        return run_pretrain(r, out, job, data, progress)
    return run_arm(r, out, job, data, progress)
