"""Continued training of dense and upcycled models: one loop, single-process or under torchrun.

    loss        LM cross-entropy + alpha * load-balancing + beta * router z-loss, each aux term summed
                over the MoE layers (`moe.aux_losses`); alpha and beta default to the model's plan
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

FLOP convention (`flops_per_token`): training FLOPs per token = 6 N + 12 L d_attn T, with N the
parameters a token passes through in matmuls, excluding the input-embedding lookup and including
the output projection (tied or not), MoE experts counted K times for top-k (min(C, E) for expert
choice, E for soft) plus the router, L attention layers, d_attn = heads * head_dim and T the sequence
length. 6N is forward (2N) + backward (4N) (Kaplan et al. 2020, §2.1; Hoffmann et al. 2022, App. F);
12 L d_attn T is the attention score and value matmuls, forward and backward, without the causal
saving (Chowdhery et al. 2022, PaLM, App. B).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import shutil
import socket
import struct
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from upcycle import yamlio
from upcycle.data import Batches, PackedData
from upcycle.errors import UpcycleError
from upcycle.moe.attention import moa_modules
from upcycle.moe.block import aux_losses, moe_blocks

PARALLEL = ("auto", "none", "ddp", "fsdp")
DTYPES = ("auto", "float32", "bfloat16")
SCHEDULES = ("cosine", "wsd")


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class TrainConfig:
    """How to train; every field is a YAML key and an `upcycle train` flag of the same name."""

    lr: float = _f(3e-4, "peak learning rate")
    min_lr: float = _f(3e-5, "learning rate at the end of the decay")
    warmup: int = _f(100, "linear warmup steps (from lr/warmup to lr)")
    schedule: str = _f(
        "cosine",
        "after the warmup: cosine (to min_lr at the last step) | wsd (warmup-stable-decay: "
        "lr until the last decay_fraction of the steps, then linear to min_lr)",
        choices=SCHEDULES,
    )
    decay_fraction: float = _f(0.2, "wsd: share of the steps spent decaying from lr to min_lr")
    steps: int = _f(1000, "optimizer steps (ignored when tokens is set)")
    tokens: int | None = _f(None, "token budget: steps = ceil(tokens / tokens per step)")
    batch_size: int = _f(8, "sequences per micro-batch and process")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    seq_len: int = _f(512, "tokens per sequence")
    clip: float = _f(1.0, "gradient clipping by global norm (0: off)")
    weight_decay: float = _f(0.1, "AdamW weight decay (matrices and experts only)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    aux_loss_coef: float | None = _f(None, "load-balancing coefficient alpha (default: the model's plan, 0.01)")
    z_loss_coef: float | None = _f(None, "router z-loss coefficient beta (default: the model's plan, 0)")
    eval_every: int = _f(100, "validation every N steps, and at the end (0: only at the end)")
    eval_batches: int = _f(8, "validation sequences per evaluation = eval_batches * batch_size (all processes)")
    checkpoint_every: int = _f(0, "checkpoint every N steps (0: only the final model)")
    keep_checkpoints: int = _f(2, "checkpoints to keep (the newest)")
    seed: int = _f(0, "seed for the data order and torch/python/numpy RNGs")
    dtype: str = _f("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16", choices=DTYPES)
    parallel: str = _f("auto", "auto (DDP under torchrun) | none | ddp | fsdp", choices=PARALLEL)
    pretrain_tokens: float | None = _f(None, "dense pretraining tokens, to report this run's compute as a share")
    pretrain_flops: float | None = _f(None, "dense pretraining FLOPs (instead of pretrain_tokens)")
    log_every: int = _f(1, "write a metrics row every N steps")

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
        d = {k: (float(v) if isinstance(v, str) and k in _FLOAT_FIELDS else v) for k, v in d.items()}
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


# YAML reads 3e-4 as a string (YAML 1.1 floats need a dot); accept it for float fields.
_FLOAT_FIELDS = {
    "lr",
    "min_lr",
    "decay_fraction",
    "clip",
    "weight_decay",
    "beta1",
    "beta2",
    "eps",
    "aux_loss_coef",
    "z_loss_coef",
    "pretrain_tokens",
    "pretrain_flops",
}


# ------------------------------------------------------------------------------------------ FLOPs


def _attention_dims(config) -> tuple[int, int]:
    """(attention layers, heads * head_dim) of a transformers config."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, heads * head_dim


def active_params(model: nn.Module, dense: bool = False, seq_len: int | None = None) -> int:
    """Parameters a token passes through in matmuls: every parameter once, except the input embedding
    (a lookup), plus the output projection when it is tied to it; an MoE block's experts count
    experts_per_token / E of their size (expert choice: over groups of seq_len tokens when given), plus the
    router. dense=True: what the dense source model had (one expert per MoE block, no router)."""
    emb = getattr(model.get_input_embeddings(), "weight", None)  # ViT's patch embedding is a matmul: counted
    out = model.get_output_embeddings()
    expert_scale: dict[int, float] = {}
    routers: set[int] = set()
    for _, b in moe_blocks(model):
        E = b.num_experts
        k = 1.0 if dense else b.router_config.experts_per_token(E, seq_len)
        for p in b.experts.parameters():
            expert_scale[id(p)] = k / E
        for p in b.router.parameters():
            routers.add(id(p))
    for _, a in moa_modules(model):  # BAM attention experts: a token uses all N (soft router)
        for p in a.per_expert_parameters():  # dense: one expert's share (shared K/V count whole)
            expert_scale[id(p)] = 1.0 / a.num_experts if dense else 1.0
        routers.add(id(a.router.weight))
    n = 0.0
    for p in {id(p): p for p in model.parameters()}.values():
        if p is emb or (dense and id(p) in routers):
            continue
        n += p.numel() * expert_scale.get(id(p), 1.0)
    if out is not None and out.weight is emb:
        n += emb.numel()
    return int(round(n))


def flops_per_token(model: nn.Module, seq_len: int, dense: bool = False) -> int:
    """Training (forward + backward) FLOPs per token: 6 N_active + 12 L d_attn T (module docstring).
    For a config without weights: flops_per_token(model_on_meta(config, plan), seq_len)."""
    L, d_attn = _attention_dims(model.config)
    moa = [a.num_experts for _, a in moa_modules(model)] if not dense else []  # N x the score/value matmuls
    return 6 * active_params(model, dense, seq_len) + 12 * d_attn * seq_len * (L + sum(moa) - len(moa))


def model_on_meta(config, plan=None) -> nn.Module:
    """A model of this config (upcycled by plan) with no storage: for counting parameters and FLOPs."""
    from transformers import AutoModelForCausalLM

    from upcycle.methods.surgery import convert_structure

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if plan is not None:
            convert_structure(model, plan)
    return model


# ------------------------------------------------------------------------------------- optimizer


def named_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on parameters of 2 or more dimensions, none on norms and biases. Each group
    lists parameter names (a tied parameter once)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(name)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw_impl(params) -> dict:
    """The fused AdamW kernel where it applies (plain CPU/CUDA tensors): one pass over each tensor and no
    per-step temporaries (a dense SmolLM2 CPU step: 4.25 s fused vs 7.13 s foreach,
    results/train_speed_cpu.md). Sharded (FSDP2 DTensor) parameters keep the per-tensor loop."""
    from torch.distributed.tensor import DTensor

    params = list(params)
    if params and all(p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor) for p in params):
        return {"fused": True}
    return {"foreach": False}


def build_optimizer(model: nn.Module, config: TrainConfig, names_model: nn.Module | None = None):
    """AdamW over `model`'s parameters; names come from `names_model` (the unwrapped model)."""
    names_model = names_model or model
    params = dict(model.named_parameters())
    groups = named_param_groups(names_model, config.weight_decay)
    opt = torch.optim.AdamW(
        [{"params": [params[n] for n in g["params"]], "weight_decay": g["weight_decay"]} for g in groups],
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        **_adamw_impl(params.values()),
    )
    opt._upcycle_names = [g["params"] for g in groups]  # parameter names per group, for name-keyed states
    return opt


def named_optimizer_state(opt) -> dict:
    """torch's index-keyed optimizer state dict with parameter names as keys instead."""
    sd = opt.state_dict()
    names = [n for g in opt._upcycle_names for n in g]
    index = {i: names[i] for g in sd["param_groups"] for i in g["params"]}
    groups = [dict(g, params=[index[i] for i in g["params"]]) for g in sd["param_groups"]]
    return {"state": {index[i]: s for i, s in sd["state"].items()}, "param_groups": groups}


def load_named_optimizer_state(opt, named: dict, config: TrainConfig | None = None) -> None:
    """Load a name-keyed state (from `named_optimizer_state` or `carry_over_optimizer_state`). Names the
    state lacks start fresh; hyperparameters come from `config` when given."""
    ours = [n for g in opt._upcycle_names for n in g]
    index = {n: i for i, n in enumerate(ours)}
    unknown = sorted(set(named["state"]) - set(index))
    if unknown:
        raise UpcycleError(f"optimizer state has parameters this model lacks: {unknown[:3]}")
    current = opt.state_dict()["param_groups"]
    opts = named["param_groups"][0] if named.get("param_groups") else {}
    groups = []
    for g, cur in zip(opt._upcycle_names, current):
        merged = {k: v for k, v in opts.items() if k not in ("params", "weight_decay")}
        groups.append(dict(cur, **merged, params=[index[n] for n in g]))
    # Copies: torch's load_state_dict keeps the given tensors, and steps would then change the caller's dict.
    state = {
        index[n]: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for n, s in named["state"].items()
    }
    opt.load_state_dict({"state": state, "param_groups": groups})
    if config is not None:
        for g, wd in zip(opt.param_groups, (config.weight_decay, 0.0)):
            g.update(betas=(config.beta1, config.beta2), eps=config.eps, weight_decay=wd)


@torch.no_grad()
def carry_over_optimizer_state(dense_state: dict, dense_model: nn.Module, moe_model: nn.Module, plan=None) -> dict:
    """A dense run's AdamW state, mapped onto the upcycled model (Sparse Upcycling's vision recipe).

    Every moment tensor goes through the same operator as its parameter: `upcycle_state_dict` with the
    plan's experts as copies, so expert e of exp_avg / exp_avg_sq is the dense MLP's; parameters that
    are not upcycled keep their state as is (same step count). Routers are new parameters: zero
    moments and step 0, which is exactly Adam's state before its first update (a carried step count
    would switch off the bias correction and make the router's first updates ~3x too large).
    `dense_state` is name-keyed (`optimizer.pt` of an `upcycle train` checkpoint) or torch's
    index-keyed `optimizer.state_dict()` of `build_optimizer(dense_model)`. Returns a name-keyed state.
    """
    from upcycle.methods.plan import UpcyclePlan
    from upcycle.methods.surgery import upcycle_state_dict

    if plan is None:
        info = getattr(moe_model.config, "upcycle", None)
        if not info:
            raise UpcycleError("the MoE model has no plan in its config; pass plan=")
        plan = UpcyclePlan.from_dict({k: v for k, v in info.items() if k != "moe_layers"})
    state = dense_state["state"]
    if state and all(isinstance(k, int) for k in state):  # torch's index-keyed form
        names = [n for g in named_param_groups(dense_model, 0.0) for n in g["params"]]
        index = {i: names[i] for g in dense_state["param_groups"] for i in g["params"]}
        state = {index[i]: s for i, s in state.items()}
    dense_names = {n for n, _ in dense_model.named_parameters()}
    unknown = sorted(set(state) - dense_names)
    if unknown:
        raise UpcycleError(
            f"the dense optimizer state has parameters the dense model lacks: {unknown[:3]}; "
            "is it the state of this model?"
        )
    if plan.expert_init in ("partition", "granular", "qwen2") or plan.shared_mlp != "none":
        what = f"expert_init={plan.expert_init}" if plan.shared_mlp == "none" else f"shared_mlp={plan.shared_mlp}"
        raise UpcycleError(
            f"optimizer carry-over copies the dense MLP's AdamW moments onto every expert; {what} "
            "slices, rescales or splits the MLP, so those moments would not belong to the new "
            "parameters. Carry-over works with expert_init copy, noise and drop; otherwise start "
            "from a fresh optimizer (the paper's language recipe)"
        )
    moment_plan = plan.replace(expert_init="copy", router_init="zeros")
    keys = sorted({k for s in state.values() for k, v in s.items() if torch.is_tensor(v) and v.dim() > 0})
    mapped: dict[str, dict[str, torch.Tensor]] = {}
    for k in keys:
        for name, t in upcycle_state_dict(
            {n: s[k] for n, s in state.items() if k in s}, moment_plan, moe_model.config
        ).items():
            mapped.setdefault(name, {})[k] = t.clone()
    if plan.expert_init == "drop":
        _zero_dropped_moments(mapped, plan, moe_model.config)
    steps = {n: s["step"] for n, s in state.items() if "step" in s}
    step = next(iter(steps.values())) if steps else torch.tensor(0.0)
    moe_params = dict(moe_model.named_parameters())
    out: dict[str, dict] = {}
    for name, s in mapped.items():
        if name not in moe_params:
            continue
        is_router = name.endswith(".router.weight") and name not in state
        s["step"] = torch.zeros_like(step) if is_router else (steps.get(name, step)).clone()
        out[name] = s
    groups = [dict(g, params=[n for n in g["params"]]) for g in named_param_groups(moe_model, 0.0)]
    opts = {k: v for k, v in (dense_state.get("param_groups") or [{}])[0].items() if k not in ("params",)}
    return {"state": out, "param_groups": [dict(opts, params=g["params"]) for g in groups]}


def _zero_dropped_moments(mapped: dict[str, dict[str, torch.Tensor]], plan, config) -> None:
    """Drop-Upcycling re-draws a share of each expert's neurons: their moments start at zero (Adam's state
    of a new parameter), the kept neurons keep the dense moments (research/algorithms.md F.5)."""
    from upcycle.methods.init import _drop_sets
    from upcycle.methods.surgery import plan_stacks

    for adapter, stack_plan, layers in plan_stacks(plan, config):
        for i in layers:
            prefix = adapter.mlp_prefix(i) + ".experts."
            for name, s in mapped.items():
                if not name.startswith(prefix):
                    continue
                proj = name[len(prefix) :]
                for t in s.values():
                    E, width = t.shape[0], t.shape[2] if proj == "down_proj" else t.shape[1]
                    for e, S in enumerate(_drop_sets(stack_plan, i, E, width)):
                        if proj == "down_proj":
                            t[e][:, S] = 0
                        elif proj != "down_bias":
                            t[e][S] = 0


# --------------------------------------------------------------------------------------- logging


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    c ^= 0xFFFFFFFF
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bytes_field(num: int, data: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(data)) + data


class EventWriter:
    """TensorBoard scalars without TensorBoard: a TFRecord file of `Event` protos written by hand
    (tensorboard and its protobuf/grpc stack would be the project's heaviest dependency, for ~40 lines).
    Fields: Event{1 wall_time double, 2 step int64, 3 file_version, 5 summary}; Summary{1 value};
    Value{1 tag, 2 simple_value float}."""

    def __init__(self, log_dir: str | Path):
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.fh = open(log_dir / name, "ab")
        self._write(b"\x09" + struct.pack("<d", time.time()) + _bytes_field(3, b"brain.Event:2"))

    def _write(self, event: bytes) -> None:
        header = struct.pack("<Q", len(event))
        self.fh.write(
            header + struct.pack("<I", _masked_crc32c(header)) + event + struct.pack("<I", _masked_crc32c(event))
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + b"\x15" + struct.pack("<f", float(v)))
            for tag, v in values.items()
            if v is not None and math.isfinite(v)
        )
        self._write(b"\x09" + struct.pack("<d", time.time()) + b"\x10" + _varint(step) + _bytes_field(5, summary))
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


METRICS = (
    "step",
    "tokens",
    "flops",
    "loss",
    "lm_loss",
    "load_balancing",
    "z_loss",
    "val_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "expert_load_max_over_mean",
    "router_entropy",
    "compute_share",
)


# ---------------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_dist(config: TrainConfig, device_type: str) -> _Dist:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        if config.parallel in ("ddp", "fsdp"):
            raise UpcycleError(
                f"parallel={config.parallel} needs several processes: launch with torchrun --nproc_per_node N"
            )
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    mode = "ddp" if config.parallel in ("auto", "ddp") else config.parallel
    if mode == "none":
        raise UpcycleError("parallel=none under torchrun with several processes; use ddp or fsdp")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), mode)


def _all_mean(values: list[float], d: _Dist) -> list[float]:
    if d.world == 1:
        return values
    import torch.distributed as dist

    # NCCL reduces device tensors only: on GPUs the values travel through the current CUDA device
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return (t / d.world).tolist()


def _barrier(d: _Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _wrap(model: nn.Module, d: _Dist, device: torch.device) -> nn.Module:
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Every parameter gets a gradient each step: the experts are whole (E, ...) tensors whose
        # token-less experts get zero rows, and the router is always used; so no find_unused_parameters.
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if d.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from upcycle.adapters import stacks_for

        for stack in stacks_for(model.config, model=model):  # T5: encoder and decoder blocks
            for block in stack.layer_list(model):
                fully_shard(block)
        fully_shard(model)
    return model


# ---------------------------------------------------------------------------------- checkpoints


def _model_state(model: nn.Module, raw: nn.Module, d: _Dist) -> dict[str, torch.Tensor]:
    """Full model state (all ranks take part under FSDP), tied duplicates dropped."""
    if d.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = raw.state_dict()
    keep = {n for n, _ in raw.named_parameters()} | {n for n, _ in raw.named_buffers()}
    return {k: v.detach().cpu().contiguous() for k, v in sd.items() if k in keep}


def _optimizer_state(model: nn.Module, opt, d: _Dist) -> dict:
    if d.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return named_optimizer_state(opt)


def _load_full_state_fsdp(model: nn.Module, opt, named: dict) -> None:
    """A name-keyed full (unsharded) AdamW state, e.g. `carry_over_optimizer_state`, into an optimizer
    over FSDP2-sharded parameters: every rank holds the full state and keeps its own shard. The groups
    (hyperparameters from this run's config) are the optimizer's own; parameters the state lacks start
    fresh."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    current = get_optimizer_state_dict(model, opt, options=options)
    known = {n for g in current["param_groups"] for n in g["params"]}
    unknown = sorted(set(named["state"]) - known)
    if unknown:
        raise UpcycleError(f"optimizer state has parameters this model lacks: {unknown[:3]}")
    state = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for n, s in named["state"].items()}
    set_optimizer_state_dict(model, opt, {"state": state, "param_groups": current["param_groups"]}, options=options)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate((s["python_version"], tuple(s["python"]), s["python_gauss"]))
    np.random.set_state(
        ("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], s["numpy_gauss"][0], s["numpy_gauss"][1])
    )
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(
    out_dir: Path, step: int, model, raw, opt, batches: Batches, state: dict, config: TrainConfig, d: _Dist
) -> None:
    from safetensors.torch import save_file

    from upcycle.io.dirs import atomic_dir

    model_sd = _model_state(model, raw, d)
    opt_sd = _optimizer_state(model, opt, d)
    if d.main:
        target = out_dir / "checkpoints" / f"step-{step:06d}"
        with atomic_dir(target, overwrite=True) as tmp:
            save_file(model_sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            torch.save(opt_sd, tmp / "optimizer.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            (tmp / "state.json").write_text(
                json.dumps(
                    dict(state, step=step, data=batches.state_dict(), config=config.to_dict(), world_size=d.world),
                    indent=1,
                )
                + "\n"
            )
        for old in checkpoints(out_dir)[: -config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(d)


def _load_model_weights(raw: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    missing, unexpected = raw.load_state_dict(sd, strict=False)
    tied = set(raw.state_dict()) - {n for n, _ in raw.named_parameters()} - {n for n, _ in raw.named_buffers()}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UpcycleError(
            f"{path}: checkpoint does not match the model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}; resume with the model the run started from"
        )


# ------------------------------------------------------------------------------------------- loop


def _coefs(model: nn.Module, config: TrainConfig) -> tuple[float, float]:
    info = getattr(model.config, "upcycle", None) or {}
    a = config.aux_loss_coef if config.aux_loss_coef is not None else info.get("aux_loss_coef", 0.01)
    b = config.z_loss_coef if config.z_loss_coef is not None else info.get("z_loss_coef", 0.0)
    return float(a), float(b)


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """A plain tensor of a possibly distributed one (FSDP2's grad norm is a replicated DTensor)."""
    if t is None:
        return None
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _router_summary(raw: nn.Module) -> torch.Tensor | None:
    """[max / mean tokens per expert, router entropy], averaged over the MoE layers of the last call, as a
    tensor on the model's device (read with the step's other metrics, in one device-to-host copy)."""
    ratios, ents = [], []
    for _, b in moe_blocks(raw):
        r = b.last_routing
        if r is None:
            continue
        c = r.counts_E.double()
        mean = c.mean()
        ratios.append(torch.where(mean > 0, c.max() / mean.clamp_min(1e-30), torch.full_like(mean, math.nan)))
        ents.append(r.entropy().double())
    if not ratios:
        return None
    return torch.stack([torch.stack(ratios).mean(), torch.stack(ents).mean()])


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


def _devices(config: TrainConfig, d_local_rank: int):
    if torch.cuda.is_available():
        device = torch.device("cuda", d_local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    use_bf16 = config.dtype == "bfloat16" or (config.dtype == "auto" and device.type == "cuda")
    if use_bf16:

        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:

        def autocast():
            return nullcontext()

    return device, autocast


def _prepare_out(out_dir: Path, resume, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (None: a fresh run); refuses to mix runs."""
    if resume:
        if resume is True:
            found = checkpoints(out_dir)
            if not found:
                raise UpcycleError(f"nothing to resume: {out_dir}/checkpoints has no complete checkpoint")
            return found[-1]
        ckpt = Path(resume)
        if not (ckpt / "state.json").is_file():
            raise UpcycleError(f"{ckpt} is not a checkpoint (no state.json); give a checkpoints/step-N directory")
        return ckpt
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise UpcycleError(
                f"output directory already exists and is not empty: {out_dir} (pass --resume to "
                "continue its run, --overwrite to start over, or choose another --out)"
            )
        shutil.rmtree(out_dir)
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
) -> list[dict]:
    """Train `model` (dense or upcycled transformers causal LM) on `data.train`, validating on `data.val`.

    resume: True picks the newest checkpoint under out_dir/checkpoints, a path picks that one; the run
    then continues exactly where it stopped (same losses, same parameters as an uninterrupted run).
    init_optimizer_state: a name-keyed AdamW state to start from (`carry_over_optimizer_state`).
    stop_at: stop after this step with a checkpoint, as an interrupted run would (the schedule still
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
    device, autocast = _devices(config, int(os.environ.get("LOCAL_RANK", "0")))
    d = _setup_dist(config, device.type)
    ckpt = _prepare_out(out_dir, resume, overwrite) if d.main else None
    if d.world > 1:
        import torch.distributed as dist

        box = [str(ckpt) if ckpt else None]
        dist.broadcast_object_list(box, src=0)
        ckpt = Path(box[0]) if box[0] else None
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        config.to_yaml(out_dir / "train_config.yaml")

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

    state: dict[str, Any] = {"history": [], "tokens": 0, "flops": 0, "train_time_s": 0.0}
    if ckpt is not None:
        state = json.loads((ckpt / "state.json").read_text())
        if state.get("world_size", 1) != d.world:
            raise UpcycleError(
                f"{ckpt} was written by a run of {state.get('world_size')} processes; resume it "
                f"with the same number (this run has {d.world})"
            )
        _load_model_weights(raw, ckpt / "model.safetensors")
    model = _wrap(raw, d, device)
    raw.train()
    opt = build_optimizer(raw, config)  # DDP shares raw's parameters; fully_shard converts raw in place
    if ckpt is not None:
        opt_sd = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
        if d.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, opt, opt_sd, options=StateDictOptions(full_state_dict=True))
        else:
            load_named_optimizer_state(opt, opt_sd)
        _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True, map_location="cpu"))
    elif init_optimizer_state is not None:
        if d.mode == "fsdp":
            _load_full_state_fsdp(model, opt, init_optimizer_state)
        else:
            load_named_optimizer_state(opt, init_optimizer_state, config)

    batches = Batches(data.train, config.batch_size, config.seed, d.rank, d.world)
    if ckpt is not None:
        batches.load_state_dict(state["data"])
    step = int(state.get("step", 0))
    history: list[dict] = state["history"]
    tb = EventWriter(out_dir / "tb") if d.main else None
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
            for g in opt.param_groups:
                g["lr"] = lr
            micro = batches.next_step(config.grad_accum)
            sums = None  # loss, lm, load balancing, z: summed on the device, read once per step
            for m, x in enumerate(micro):
                x = x.to(device)
                sync = d.mode == "none" or m == len(micro) - 1
                if d.mode == "fsdp":  # accumulate unsharded gradients; reduce-scatter once, on the last one
                    model.set_requires_gradient_sync(sync)
                with nullcontext() if sync or d.mode != "ddp" else model.no_sync():
                    with autocast():
                        lm = model(input_ids=x, labels=x).loss
                        aux = aux_losses(raw, alpha, beta)
                        lb = aux.get("load_balancing", lm.new_zeros(()))
                        z = aux.get("z_loss", lm.new_zeros(()))
                        loss = lm + lb + z
                    (loss / len(micro)).backward()
                part = torch.stack([v.detach().double() for v in (loss, lm, lb, z)]) / len(micro)
                sums = part if sums is None else sums + part
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip) if config.clip > 0 else None
            opt.step()
            opt.zero_grad(set_to_none=True)
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


def _save_final(model, raw: nn.Module, target: Path, d: _Dist, tokenizer, source_dir) -> None:
    """Native format for upcycled models, a transformers directory for dense ones (atomic)."""
    from upcycle.formats.native import save as native_save
    from upcycle.io.dirs import SIDE_FILES, atomic_dir
    from upcycle.methods.registry import plan_from_dict

    sd = _model_state(model, raw, d) if d.mode == "fsdp" else None
    if not d.main:
        return
    if sd is not None:  # FSDP: rebuild an unsharded replica on rank 0 from the gathered state
        raw = _replica(raw)
        _load_sd(raw, sd)
    raw.eval()
    info = getattr(raw.config, "upcycle", None)
    if moe_blocks(raw):
        if not info:
            raise UpcycleError("an MoE model without a plan in its config cannot be saved in the native format")
        plan = plan_from_dict(info)  # UpcyclePlan, or BamPlan for BAM / BTX
        native_save(raw, plan, target, source_dir=source_dir, overwrite=True)
        if tokenizer is not None and source_dir is None:
            tokenizer.save_pretrained(target)
        return
    with atomic_dir(target, overwrite=True) as tmp:
        raw.save_pretrained(tmp)
        if source_dir is not None:
            for name in SIDE_FILES:
                if (Path(source_dir) / name).is_file() and not (tmp / name).exists():
                    shutil.copy2(Path(source_dir) / name, tmp / name)
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def _replica(raw: nn.Module) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from upcycle.io.models import _empty_model
    from upcycle.methods.bam import BamPlan
    from upcycle.methods.bam import convert_structure as bam_structure
    from upcycle.methods.registry import plan_from_dict
    from upcycle.methods.surgery import convert_structure

    dtype = next(iter(raw.state_dict().values())).dtype
    rep = _empty_model(AutoModelForCausalLM, raw.config, dtype)
    info = getattr(raw.config, "upcycle", None)
    if moe_blocks(raw):
        plan = plan_from_dict(info)  # UpcyclePlan, or BamPlan for BAM / BTX
        (bam_structure if isinstance(plan, BamPlan) else convert_structure)(rep, plan, info.get("moe_layers"))
    return rep


def _load_sd(raw: nn.Module, sd: dict) -> None:
    missing, unexpected = raw.load_state_dict(sd, strict=False)
    if unexpected:
        raise UpcycleError(f"state does not match the model: unexpected {unexpected[:3]}")
    raw.tie_weights()
