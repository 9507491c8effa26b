"""Processes and devices: single process, DDP or FSDP2 (`fully_shard` per decoder layer, then the
root), picked from the environment torchrun sets; the device and autocast dtype a run uses.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from upcycle.errors import UpcycleError
from upcycle.train.config import TrainConfig


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


def _grad_sync(model: nn.Module, d: _Dist, last: bool):
    """The context of one micro-batch's forward and backward: gradients are reduced across processes on
    the last micro-batch of a step only (DDP: no_sync before it; FSDP2: unsharded gradients accumulate,
    then one reduce-scatter)."""
    sync = d.mode == "none" or last
    if d.mode == "fsdp":
        model.set_requires_gradient_sync(sync)
    return nullcontext() if sync or d.mode != "ddp" else model.no_sync()


def devices(config: TrainConfig, d_local_rank: int):
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
