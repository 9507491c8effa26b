"""The MoE block: router + experts (+ an optional always-on shared expert).

It replaces a dense MLP one for one: it takes hidden states of any leading shape (..., D) and returns
the same shape, so the host architecture's decoder layer needs no change. Each call keeps its routing
in `self.last_routing` (tensors with their graph), from which `aux_loss` and `router_stats` read;
nothing is global.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn

from upcycle.moe import routing as R
from upcycle.moe.experts import Experts


class RoutedPlan(Protocol):
    """What a router is built from (methods.plan.UpcyclePlan is one; this package does not import methods)."""

    router: str | None
    top_k: int
    ec_group: str

    @property
    def normalize_weights(self) -> bool: ...

    @property
    def capacity(self) -> float | None: ...


@dataclass(frozen=True)
class RouterConfig:
    kind: str = "topk"  # topk | expert_choice | soft
    top_k: int = 2
    normalize: bool = True
    capacity_factor: float | None = None
    ec_group: str = "sequence"  # expert_choice: route within each sequence, or over the whole batch

    @classmethod
    def from_plan(cls, plan: RoutedPlan) -> "RouterConfig":
        if plan.router is None:
            raise ValueError("the plan names no router: resolve the family's with plan.for_stack(adapter) first")
        return cls(plan.router, plan.top_k, plan.normalize_weights, plan.capacity, plan.ec_group)

    @property
    def ec_capacity(self) -> float:
        """Expert-choice capacity factor, the paper's C = 2 when none was given."""
        return self.capacity_factor or R.EC_CAPACITY_FACTOR

    def experts_per_token(self, num_experts: int, group_tokens: int | None = None) -> float:
        """Experts each token uses on average: K (top-k, before any dropping), all of them (soft), or, for
        expert choice, E * min(ceil(C * N / E), N) / N over groups of N tokens: the rounding up makes it
        more than C at small N (2.35 at C = 2, E = 8, N = 17). group_tokens: N, the sequence length for
        per-sequence groups; without it (or with ec_group batch, whose N is the whole batch) min(C, E),
        the large-N limit."""
        if self.kind == "topk":
            return self.top_k
        if self.kind == "soft":
            return num_experts
        if group_tokens and self.ec_group == "sequence":
            return num_experts * R.ec_tokens_per_expert(self.ec_capacity, group_tokens, num_experts) / group_tokens
        return min(self.ec_capacity, num_experts)


class MoEBlock(nn.Module):
    def __init__(self, experts: Experts, router: RouterConfig, shared_expert: nn.Module | None = None):
        super().__init__()
        self.router_config = router
        self.router = nn.Linear(
            experts.hidden_size,
            experts.num_experts,
            bias=False,
            dtype=experts.up_proj.dtype,
            device=experts.up_proj.device,
        )
        self.experts = experts
        self.shared_expert = shared_expert
        self.last_routing: R.Routing | None = None
        # Padding mask (B, N) of the current forward, set by the host model's hook (surgery.wire_padding_mask)
        # for encoders; expert choice never picks a token whose mask is 0.
        self.token_mask: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def route(self, logits_TE: torch.Tensor, lead_shape: torch.Size, mask: torch.Tensor | None = None) -> R.Routing:
        rc = self.router_config
        mask_T = None if mask is None else mask.reshape(-1)
        if rc.kind == "topk":
            return R.topk_route(logits_TE, rc.top_k, rc.normalize, rc.capacity_factor, mask_T)
        if rc.kind == "soft":
            return R.soft_route(logits_TE, mask_T)
        if rc.kind == "expert_choice":
            groups = lead_shape[0] if (rc.ec_group == "sequence" and len(lead_shape) >= 2) else 1
            logits_GNE = logits_TE.view(groups, -1, logits_TE.shape[-1])
            mask_GN = None if mask is None else mask.reshape(groups, -1)
            return R.expert_choice_route(logits_GNE, rc.ec_capacity, rc.normalize, mask_GN)
        raise ValueError(f"unknown router kind {rc.kind!r}")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        *lead, D = hidden.shape
        x_TD = hidden.reshape(-1, D)
        T = x_TD.shape[0]
        logits_TE = R.router_logits(x_TD, self.router.weight)  # router math in fp32, autocast or not
        mask = self.token_mask  # padding is routed to no expert, by every router
        if (
            mask is not None
            and len(lead) == 2
            and mask.dim() == 2
            and mask.shape[0] == lead[0]
            and mask.shape[1] > lead[1]
        ):
            mask = mask[:, -lead[1] :]  # a cached decoder step: the mask covers the past too; these are the newest
        if mask is not None:
            if tuple(mask.shape) != tuple(lead):
                raise ValueError(
                    f"padding mask of shape {tuple(mask.shape)} does not match the hidden states "
                    f"{tuple(lead)}: pass a (batch, sequence) attention mask of 0/1"
                )
            mask = mask.to(device=hidden.device) != 0
        r = self.route(logits_TE, torch.Size(lead), mask)
        self.last_routing = r
        x_AD = x_TD.index_select(0, r.token_A)
        if r.keep_A is not None:  # rows past the experts' counts (dropped, padding): no expert computes them
            x_AD = torch.where(r.keep_A.unsqueeze(1), x_AD, 0.0)  # ... and no gradient comes back from them
        y_AD = self.experts(x_AD, r.counts_E)
        if r.keep_A is not None:  # the experts leave those rows unwritten
            y_AD = torch.where(r.keep_A.unsqueeze(1), y_AD, 0.0)
        y_AD = y_AD * r.weight_A.to(y_AD.dtype).unsqueeze(1)  # weighting after the experts: router gradient
        # Deterministic combine: each assignment owns one slot; sum the S slots of every token.
        S = r.slots_per_token
        out_TSD = y_AD.new_zeros(T * S, D).index_copy_(0, r.slot_A, y_AD).view(T, S, D)  # in place: no clone
        out_TD = out_TSD.sum(dim=1) if S > 1 else out_TSD[:, 0]
        if self.shared_expert is not None:
            out_TD = out_TD + self.shared_expert(x_TD).to(out_TD.dtype)
        return out_TD.to(hidden.dtype).view(*lead, D)

    def aux_loss(self, aux_loss_coef: float, z_loss_coef: float) -> dict[str, torch.Tensor]:
        """Load-balancing and z-loss of the last call (token-choice routers only get the balancing term)."""
        r = self.last_routing
        if r is None:
            raise RuntimeError("aux_loss() needs a forward pass first")
        zero = r.logits_TE.new_zeros(())
        lb = (
            R.load_balancing_loss(r.probs_TE, r.topk_idx_TK, r.mask_T)
            if (self.router_config.kind == "topk" and aux_loss_coef)
            else zero
        )
        z = R.z_loss(r.logits_TE, r.mask_T) if z_loss_coef else zero
        return {"load_balancing": aux_loss_coef * lb, "z_loss": z_loss_coef * z}

    def router_stats(self) -> dict[str, object]:
        """Tokens per expert, dropped assignments and tokens, router entropy of the last call (host values)."""
        r = self.last_routing
        if r is None:
            raise RuntimeError("router_stats() needs a forward pass first")
        return {
            "tokens": r.num_tokens,
            "tokens_per_expert": r.counts_E.tolist(),
            "dropped_assignments": int(r.dropped_assignments),
            "dropped_tokens": int(r.dropped_tokens),
            # non-padding tokens no expert processed (expert choice leaves some behind when C < E)
            "tokens_left_behind": float(r.dropped_tokens)
            / max(int(r.real_tokens) if r.real_tokens is not None else r.num_tokens, 1),
            "entropy": float(r.entropy()),
        }


class SharedExpert(nn.Module):
    """An always-on gated MLP beside the routed experts (Qwen2-MoE layout): act(x Wg) * (x Wu) Wd, times
    sigmoid(x w) when `gated` (the `gate` row), else times 1."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        act_fn,
        gated: bool = True,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)
        self.gate = nn.Linear(hidden_size, 1, **kw) if gated else None
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return y * torch.sigmoid(self.gate(x)) if self.gate is not None else y


def moe_blocks(model: nn.Module) -> list[tuple[str, MoEBlock]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEBlock)]


def aux_losses(model: nn.Module, aux_loss_coef: float, z_loss_coef: float) -> dict[str, torch.Tensor]:
    """Sum of every MoE block's aux losses from the last forward pass (BAM/BTX style sum over layers)."""
    total: dict[str, torch.Tensor] = {}
    for _, block in moe_blocks(model):
        for k, v in block.aux_loss(aux_loss_coef, z_loss_coef).items():
            total[k] = total[k] + v if k in total else v
    return total
