"""Continued training of dense and upcycled models: one loop, single-process or under torchrun.

    loss        LM cross-entropy + alpha * load-balancing + beta * router z-loss, each aux term summed
                over the MoE layers (`moe.block.aux_losses`); alpha and beta default to the model's plan
                (0.01 and 0, the paper's T5 decoder values); every term is logged separately
    optimizer   AdamW (decay on matrices and experts, none on norms and biases), linear warmup then
                cosine to min_lr, gradient clipping by global norm; optionally started from a dense
                run's state carried over to the MoE parameters (`carry_over_optimizer_state`)
    precision   fp32 on CPU; on CUDA fp32 master weights with bf16 autocast
    parallel    single process, DDP or FSDP2 (`fully_shard` per decoder layer, then the root), picked
                from the environment torchrun sets; `batch_size` is per process and micro-batch, so the
                global batch is batch_size * grad_accum * world_size sequences
    checkpoints out/checkpoints/step-N/ (atomic): model.safetensors, optimizer.pt (parameter-name keyed,
                read with weights_only=True), rng.pt, state.json (step, data position, history);
                the last `keep_checkpoints` are kept; resume continues bit-exactly
    outputs     out/metrics.csv, out/tb/ (TensorBoard events), out/summary.json, out/model/ (native
                format for upcycled models, a transformers directory for dense ones)

The pieces live beside this loop: config (TrainConfig), step (the optimizer step of a micro-batched
loss, which the ViT experiment's loop takes too), flops (the FLOP convention), optim (AdamW and
its carry-over), dist (DDP/FSDP, devices), checkpoint, metrics (csv and TensorBoard), final (the saved
model). `upcycle.train` exports this loop and TrainConfig; the rest is imported from the module that owns it.
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from upcycle.data.tokens import Batches, PackedData
from upcycle.errors import UpcycleError
from upcycle.train.checkpoint import (
    _load_full_state_fsdp,
    _save_checkpoint,
    _set_rng_state,
    load_model_weights,
    load_pt,
    read_state,
    refuse_mixed_runs,
    resume_point,
)
from upcycle.train.config import TrainConfig
from upcycle.train.dist import _all_mean, _barrier, _Dist, _grad_sync, _setup_dist, _wrap, devices
from upcycle.train.final import _save_final
from upcycle.train.flops import active_params, flops_per_token
from upcycle.train.metrics import METRICS, TensorBoardScalars, _local, _router_summary
from upcycle.train.optim import build_optimizer, load_named_optimizer_state
from upcycle.train.step import optimizer_step


def _coefs(model: nn.Module, config: TrainConfig) -> tuple[float, float]:
    info = getattr(model.config, "upcycle", None) or {}
    a = config.aux_loss_coef if config.aux_loss_coef is not None else info.get("aux_loss_coef", 0.01)
    b = config.z_loss_coef if config.z_loss_coef is not None else info.get("z_loss_coef", 0.0)
    return float(a), float(b)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    seqs: torch.Tensor,
    batch_size: int,
    max_batches: int,
    device,
    autocast=nullcontext,
    d: _Dist | None = None,
) -> float | None:
    """Mean LM loss over the first max_batches * batch_size validation sequences, whatever the number
    of processes: each rank scores every world-th of them (the count rounded down to a multiple of the
    world size, so every rank runs as many forward passes, which FSDP needs)."""
    d = d or _Dist()
    n = min(seqs.shape[0], max_batches * batch_size)
    n -= n % d.world
    if n == 0:
        return None
    mine = seqs[:n][d.rank :: d.world]
    was = model.training
    model.eval()
    total = 0.0
    for i in range(0, mine.shape[0], batch_size):
        x = mine[i : i + batch_size].to(device)
        with autocast():
            loss = model(input_ids=x, labels=x).loss  # every sequence has seq_len tokens: mean of means
        total += float(loss) * x.shape[0]
    model.train(was)
    (total,) = _all_mean([total], d)
    return total * d.world / n


def _prepare_out(out_dir: Path, resume, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (None: a fresh run); refuses to mix runs."""
    refuse_mixed_runs(out_dir, resume, overwrite)
    if resume:
        return resume_point(out_dir, resume, log=lambda m: print(m, file=sys.stderr))
    if out_dir.exists() and any(out_dir.iterdir()):  # overwrite, or a run killed before its first checkpoint
        from upcycle.io.dirs import remove_for_overwrite

        remove_for_overwrite(out_dir)
    return None


def train(
    model: nn.Module,
    data: PackedData,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    init_optimizer_state: dict | None = None,
    tokenizer=None,
    source_dir: str | Path | None = None,
    progress: bool = True,
    save_model: bool = True,
    stop_at: int | None = None,
    accept_changes: bool = False,
) -> list[dict]:
    """Train `model` (dense or upcycled transformers causal LM) on `data.train`, validating on `data.val`.

    resume: True picks the newest checkpoint under out_dir/checkpoints, a path picks that one; the run
    then continues exactly where it stopped (same losses, same parameters as an uninterrupted run).
    init_optimizer_state: a name-keyed AdamW state to start from (`carry_over_optimizer_state`).
    accept_changes: resume with settings other than the checkpoint's (refused otherwise; the run's earlier
    train_config.yaml is kept as train_config.step-N.yaml). stop_at: stop after this step with a checkpoint, as an interrupted run would (the schedule still
    runs to the full length; resume later). tokenizer / source_dir: saved / copied next to the final
    model. Returns the history: one dict per
    logged step with the keys of METRICS (None where not measured at that step).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if data.seq_len != config.seq_len:
        raise UpcycleError(
            f"the data is packed into sequences of {data.seq_len} tokens but seq_len is "
            f"{config.seq_len}; pack it with the same seq_len"
        )
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and config.seq_len > max_pos:
        import warnings

        from upcycle.errors import UpcycleWarning

        warnings.warn(
            f"seq_len {config.seq_len} is above the model's max_position_embeddings {max_pos}: positions past "
            f"{max_pos} were never trained (and some models cannot represent them)",
            UpcycleWarning,
            stacklevel=2,
        )
    device, autocast = devices(config, int(os.environ.get("LOCAL_RANK", "0")))
    d = _setup_dist(config, device.type)
    ckpt = _prepare_out(out_dir, resume, overwrite) if d.main else None
    if d.world > 1:
        import torch.distributed as dist

        box = [str(ckpt) if ckpt else None]
        dist.broadcast_object_list(box, src=0)
        ckpt = Path(box[0]) if box[0] else None
    state: dict[str, Any] = {"history": [], "tokens": 0, "flops": 0, "train_time_s": 0.0}
    changes: list[str] = []
    if ckpt is not None:
        state, changes = read_state(ckpt, config, accept_changes)  # before anything is written
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        recorded = out_dir / "train_config.yaml"
        if changes and recorded.is_file():
            os.replace(recorded, out_dir / f"train_config.step-{int(state['step']):06d}.yaml")
        config.to_yaml(recorded)

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    raw = model
    raw.to(device)
    if getattr(raw.config, "use_cache", None):
        raw.config.use_cache = False
    alpha, beta = _coefs(raw, config)
    total_steps = config.total_steps(d.world)
    tokens_per_step = config.tokens_per_step(d.world)
    fpt = flops_per_token(raw, config.seq_len)
    fpt_dense = flops_per_token(raw, config.seq_len, dense=True)
    pretrain_flops = config.pretrain_flops or (config.pretrain_tokens * fpt_dense if config.pretrain_tokens else None)

    if ckpt is not None:
        if state.get("world_size", 1) != d.world:
            raise UpcycleError(
                f"{ckpt} was written by a run of {state.get('world_size')} processes; resume it "
                f"with the same number (this run has {d.world})"
            )
        load_model_weights(raw, ckpt / "model.safetensors")
    model = _wrap(raw, d, device)
    raw.train()
    opt = build_optimizer(raw, config)  # DDP shares raw's parameters; fully_shard converts raw in place
    if ckpt is not None:
        opt_sd = load_pt(ckpt / "optimizer.pt")
        if d.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, opt, opt_sd, options=StateDictOptions(full_state_dict=True))
        else:
            load_named_optimizer_state(opt, opt_sd)
        _set_rng_state(load_pt(ckpt / "rng.pt"))
    elif init_optimizer_state is not None:
        if d.mode == "fsdp":
            _load_full_state_fsdp(model, opt, init_optimizer_state)
        else:
            load_named_optimizer_state(opt, init_optimizer_state, config)

    def lm_loss(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device)
        return model(input_ids=x, labels=x).loss

    batches = Batches(data.train, config.batch_size, config.seed, d.rank, d.world)
    if ckpt is not None:
        batches.load_state_dict(state["data"])
    step = int(state.get("step", 0))
    history: list[dict] = state["history"]
    tb = TensorBoardScalars(out_dir / "tb") if d.main else None
    csv_path = out_dir / "metrics.csv"
    if d.main:
        with open(csv_path, "w", newline="") as fh:  # rewritten from the history: no rows past the checkpoint
            w = csv.DictWriter(fh, fieldnames=METRICS)
            w.writeheader()
            w.writerows(history)
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not (progress and d.main), dynamic_ncols=True)
    last_val = None
    try:
        while step < total_steps:
            if stop_at is not None and step >= stop_at:
                break
            t0 = time.perf_counter()
            lr = config.lr_at(step, total_steps)
            sums, gn = optimizer_step(  # loss, lm, load balancing, z: on the device, read once per step
                model,
                opt,
                lr,
                batches.next_step(config.grad_accum),
                lm_loss,
                (alpha, beta),
                config.clip,
                raw=raw,
                grad_sync=lambda last: _grad_sync(model, d, last),
                autocast=autocast,
            )
            # One device-to-host read per step for every metric (a float() each would stall a GPU ~65 times)
            router, gn = _router_summary(raw), _local(gn)
            vals = torch.cat([sums] + [t.reshape(-1).to(sums) for t in (router, gn) if t is not None]).tolist()
            losses, rest = vals[:4], iter(vals[4:])
            balance, entropy = (next(rest), next(rest)) if router is not None else (None, None)
            grad_norm = next(rest) if gn is not None else None
            step += 1
            dt = time.perf_counter() - t0
            loss_v, lm_v, lb_v, z_v = _all_mean(losses, d)
            state["tokens"] += tokens_per_step
            state["flops"] += fpt * tokens_per_step
            state["train_time_s"] += dt
            val = None
            if step == total_steps or (config.eval_every and step % config.eval_every == 0):
                val = evaluate_loss(model, data.val, config.batch_size, config.eval_batches, device, autocast, d)
                last_val = val
            row = {
                "step": step,
                "tokens": state["tokens"],
                "flops": state["flops"],
                "loss": loss_v,
                "lm_loss": lm_v,
                "load_balancing": lb_v,
                "z_loss": z_v,
                "val_loss": val,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_step / dt,
                "expert_load_max_over_mean": balance,
                "router_entropy": entropy,
                "compute_share": state["flops"] / pretrain_flops if pretrain_flops else None,
            }
            if step % config.log_every == 0 or val is not None or step == total_steps:
                history.append(row)
                if d.main:
                    with open(csv_path, "a", newline="") as fh:
                        csv.DictWriter(fh, fieldnames=METRICS).writerow(row)
                    tb.scalars(step, {k: v for k, v in row.items() if k != "step" and v is not None})
            post = {"loss": f"{loss_v:.4f}", "tok/s": f"{tokens_per_step / dt:,.0f}"}
            if balance is not None:
                post["load max/mean"] = f"{balance:.2f}"
            if last_val is not None:
                post["val"] = f"{last_val:.4f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == stop_at:
                _save_checkpoint(out_dir, step, model, raw, opt, batches, state, config, d)
    finally:
        bar.close()
        if tb is not None:
            tb.close()

    if step < total_steps:  # stopped early: the checkpoint is the output
        _barrier(d)
        return history
    summary = {
        "steps": step,
        "tokens": state["tokens"],
        "flops": state["flops"],
        "flops_per_token": fpt,
        "dense_flops_per_token": fpt_dense,
        "active_params": active_params(raw),
        "pretrain_flops": pretrain_flops,
        "compute_share": state["flops"] / pretrain_flops if pretrain_flops else None,
        "final_train_loss": history[-1]["loss"] if history else None,
        "final_val_loss": last_val,
        "train_time_s": state["train_time_s"],
        "world_size": d.world,
        "parallel": d.mode,
        "aux_loss_coef": alpha,
        "z_loss_coef": beta,
        "data": data.info,
    }
    if save_model:
        _save_final(model, raw, out_dir / "model", d, tokenizer, source_dir)
    if d.main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _barrier(d)
    return history
