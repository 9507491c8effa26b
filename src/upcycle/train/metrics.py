"""What a run logs: the metrics.csv columns, TensorBoard scalars (through tensorboard's own
SummaryWriter), and the router statistics gathered from the MoE blocks each logging step.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from upcycle.moe.block import moe_blocks


class TensorBoardScalars:
    """TensorBoard scalars written by tensorboard's own SummaryWriter (torch.utils.tensorboard): one
    event per tag and step in OUT/tb/; None and non-finite values are left out, as in metrics.csv."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        for tag, v in values.items():
            if v is not None and math.isfinite(v):
                self.writer.add_scalar(tag, float(v), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


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
