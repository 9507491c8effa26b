"""One optimizer step, the one every training loop takes (`train.loop.train` for causal LMs, the ViT
experiment's `train_steps`): set the step's learning rate; per micro-batch the task loss plus the MoE aux
losses (`moe.block.aux_losses`), backward, averaged over the micro-batches; clip by global norm; step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

import torch
import torch.nn as nn

from upcycle.moe.block import aux_losses

Batch = TypeVar("Batch")


def optimizer_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    lr: float,
    micro: Sequence[Batch],
    task_loss: Callable[[Batch], torch.Tensor],
    coefs: tuple[float, float],
    clip: float,
    *,
    raw: nn.Module | None = None,
    grad_sync: Callable[[bool], AbstractContextManager] | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One AdamW step at learning rate `lr` over the micro-batches `micro`: loss = task_loss(batch) +
    load balancing + z-loss (coefs: their coefficients alpha, beta), each micro-batch's loss / len(micro)
    backpropagated; gradients clipped to global norm `clip` (none when clip <= 0); gradients zeroed before
    (whatever the caller left) and freed after.

    model: what runs forward and gets clipped (a DDP or FSDP wrapper, or the model itself); raw: the
    unwrapped model whose MoE blocks hold the aux losses (default: model). grad_sync(last): the context
    of one micro-batch's forward and backward (gradient reduction on the last only: `dist._grad_sync`).
    Returns the means over the micro-batches of (loss, task loss, load balancing, z-loss), float64 on the
    device, to be read once per step, and the gradient norm before clipping (None without clipping)."""
    for g in opt.param_groups:
        g["lr"] = lr
    raw = model if raw is None else raw
    alpha, beta = coefs
    opt.zero_grad(set_to_none=True)
    sums = None
    for m, batch in enumerate(micro):
        with grad_sync(m == len(micro) - 1) if grad_sync is not None else nullcontext():
            with autocast():
                task = task_loss(batch)
                aux = aux_losses(raw, alpha, beta)
                lb = aux.get("load_balancing", task.new_zeros(()))
                z = aux.get("z_loss", task.new_zeros(()))
                loss = task + lb + z
            (loss / len(micro)).backward()
        part = torch.stack([v.detach().double() for v in (loss, task, lb, z)]) / len(micro)
        sums = part if sums is None else sums + part
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), clip) if clip > 0 else None
    opt.step()
    opt.zero_grad(set_to_none=True)
    return sums, gn
