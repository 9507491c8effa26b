"""Function preservation, perplexity, and expert load (what the routers do with real text).

Perplexity protocol: the text is tokenised once (no BOS added beyond what the tokenizer adds), cut
into disjoint windows of `context` tokens, and every token but the first of each window is scored.
Both models of a comparison see exactly the same windows.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from upcycle.errors import UpcycleError


def held_out_text() -> tuple[str, str]:
    """Default evaluation text: the source of Python's own `textwrap` module (ships with every Python)."""
    path = Path(textwrap.__file__)
    return path.read_text(), f"python stdlib {path.name}"


def _windows(ids_N: torch.Tensor, context: int):
    """Disjoint windows of `context` tokens, as (1, n) batches; a last window of one token is dropped
    (it has nothing to score)."""
    for start in range(0, ids_N.numel(), context):
        window = ids_N[start : start + context].unsqueeze(0)
        if window.shape[1] >= 2:
            yield window


def _nll(logits: torch.Tensor, window: torch.Tensor) -> float:
    return nn.functional.cross_entropy(logits[0, :-1].float(), window[0, 1:].to(logits.device), reduction="sum").item()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model: nn.Module, ids_N: torch.Tensor, context: int = 512) -> float:
    nll, count = 0.0, 0
    for window in _windows(ids_N, context):
        nll += _nll(model(window.to(_device(model))).logits, window)
        count += window.shape[1] - 1
    return math.exp(nll / count)


@dataclass
class Preservation:
    tokens: int
    max_abs: float  # max |logits_moe - logits_dense|
    max_rel: float  # max_abs / max |logits_dense|
    top1_agreement: float  # share of positions whose argmax token is the same
    ppl_dense: float
    ppl_moe: float


@torch.no_grad()
def compare(moe: nn.Module, dense: nn.Module, ids_N: torch.Tensor, context: int = 512) -> Preservation:
    """Logit differences and both perplexities, from one forward pass of each model per window."""
    max_abs, ref_max, agree, n = 0.0, 0.0, 0, 0
    nll_moe, nll_dense, scored = 0.0, 0.0, 0
    for window in _windows(ids_N, context):
        a = moe(window.to(_device(moe))).logits.float()
        b = dense(window.to(_device(dense))).logits.float().to(a.device)
        for name, logits in (("dense", b), ("upcycled", a)):
            if not torch.isfinite(logits).all():
                raise UpcycleError(
                    f"the {name} model computes non-finite logits (NaN or Inf): its weights hold NaN/Inf or overflow "
                    "in this dtype; check the checkpoint (or load it in float32)"
                )
        max_abs = max(max_abs, (a - b).abs().max().item())
        ref_max = max(ref_max, b.abs().max().item())
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        n += window.shape[1]
        nll_moe += _nll(a, window)
        nll_dense += _nll(b, window)
        scored += window.shape[1] - 1
    return Preservation(
        n, max_abs, max_abs / ref_max, agree / n, math.exp(nll_dense / scored), math.exp(nll_moe / scored)
    )


def format_table(rows: list[tuple[str, str]], title: str | None = None) -> str:
    w = max(len(k) for k, _ in rows)
    v = max(len(x) for _, x in rows)
    lines = [f"| {'metric'.ljust(w)} | {'value'.ljust(v)} |", f"|{'-' * (w + 2)}|{'-' * (v + 2)}|"]
    lines += [f"| {k.ljust(w)} | {x.ljust(v)} |" for k, x in rows]
    return ((title + "\n") if title else "") + "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A markdown table; `align` has one letter per column, l or r (default: first column left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    cells = [header] + rows
    w = [max(len(r[j]) for r in cells) for j in range(len(header))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w[j]) if align[j] == "l" else c.rjust(w[j]) for j, c in enumerate(r)) + " |"

    rule = "|" + "|".join("-" * (w[j] + 1) + (":" if align[j] == "r" else "-") for j in range(len(header))) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in rows])


# ---------------------------------------------------------------------------------------------------------
# Expert load: what the routers did with real text.
#
# Counts are token-expert assignments. For a top-k router without capacity every token makes K of them, so a
# layer's counts sum to K * tokens; with a capacity factor the assignments past an expert's capacity are
# dropped (counted separately, and `demand` keeps what the router asked for). An expert-choice expert takes
# exactly its capacity c per routing group, and `dropped_tokens` counts the tokens no expert picked.
# Routing happens per evaluation window (batch of one), exactly as in `perplexity`.
# ---------------------------------------------------------------------------------------------------------


def _layer_index(name: str, position: int) -> int:
    nums = [int(p) for p in name.split(".") if p.isdigit()]
    return nums[-1] if nums else position


def _router_label(block) -> str:
    rc = block.router_config
    if rc.kind == "topk":
        return f"topk k={rc.top_k}" + (f" C={rc.capacity_factor:g}" if rc.capacity_factor is not None else "")
    if rc.kind == "expert_choice":
        return f"expert_choice C={rc.ec_capacity:g}"
    return rc.kind


@dataclass
class ExpertLoad:
    """Routing statistics of every MoE layer of a model over the same tokens.

    counts[l, e]   token-expert assignments expert e processed in MoE layer l (after capacity dropping)
    demand[l, e]   assignments the router chose before any capacity cut (top-k: its top-k picks; expert
                   choice and soft: equal to counts)
    dropped_assignments[l], dropped_tokens[l]   assignments cut by capacity; tokens that no expert processed
    router_entropy[l]   mean over tokens of the entropy of the router softmax, nats (log E = uniform router)
    """

    layers: list[int]  # model layer index of each MoE layer
    routers: list[str]  # router of each layer, e.g. "topk k=2"
    num_experts: int
    tokens: int  # tokens routed through every layer
    counts: torch.Tensor  # (L, E) int64
    demand: torch.Tensor  # (L, E) int64
    dropped_assignments: torch.Tensor  # (L,) int64
    dropped_tokens: torch.Tensor  # (L,) int64
    router_entropy: torch.Tensor  # (L,) float64, nats

    @property
    def share(self) -> torch.Tensor:
        """(L, E) share of each layer's router selections (demand) that went to each expert; rows sum to 1."""
        d = self.demand.double()
        return d / d.sum(1, keepdim=True).clamp_min(1)

    @property
    def relative_load(self) -> torch.Tensor:
        """share * E: 1 everywhere for a perfectly balanced layer, E for an expert that takes everything."""
        return self.share * self.num_experts

    @property
    def load_entropy(self) -> torch.Tensor:
        """(L,) entropy of the load distribution divided by log E: 1 = balanced, 0 = one expert takes all."""
        p = self.share
        h = -(p * torch.log(p.clamp_min(1e-300))).sum(1)
        return h / math.log(self.num_experts) if self.num_experts > 1 else torch.ones_like(h)

    @property
    def router_entropy_norm(self) -> torch.Tensor:
        return (
            self.router_entropy / math.log(self.num_experts)
            if self.num_experts > 1
            else torch.zeros_like(self.router_entropy)
        )

    @property
    def dropped_token_share(self) -> torch.Tensor:
        return self.dropped_tokens.double() / max(self.tokens, 1)

    @property
    def dropped_assignment_share(self) -> torch.Tensor:
        return self.dropped_assignments.double() / self.demand.sum(1).double().clamp_min(1)

    @classmethod
    def total(cls, loads: list["ExpertLoad"]) -> "ExpertLoad":
        """The statistics of several evaluations of the same model together (entropy weighted by tokens)."""
        first = loads[0]
        tokens = sum(x.tokens for x in loads)
        ent = sum(x.router_entropy * x.tokens for x in loads) / max(tokens, 1)
        return cls(
            first.layers,
            first.routers,
            first.num_experts,
            tokens,
            sum(x.counts for x in loads),
            sum(x.demand for x in loads),
            sum(x.dropped_assignments for x in loads),
            sum(x.dropped_tokens for x in loads),
            ent,
        )

    def to_dict(self) -> dict:
        return {
            "layers": self.layers,
            "routers": self.routers,
            "num_experts": self.num_experts,
            "tokens": self.tokens,
            "tokens_per_expert": self.counts.tolist(),
            "router_choices_per_expert": self.demand.tolist(),
            "dropped_assignments": self.dropped_assignments.tolist(),
            "dropped_tokens": self.dropped_tokens.tolist(),
            "dropped_token_share": self.dropped_token_share.tolist(),
            "dropped_assignment_share": self.dropped_assignment_share.tolist(),
            "router_entropy_nats": self.router_entropy.tolist(),
            "router_entropy_over_log_e": self.router_entropy_norm.tolist(),
            "load_entropy_over_log_e": self.load_entropy.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ExpertLoad":
        """Inverse of `to_dict` (for example the "expert_load" entry of an eval.json)."""
        return cls(
            list(d["layers"]),
            list(d["routers"]),
            int(d["num_experts"]),
            int(d["tokens"]),
            torch.tensor(d["tokens_per_expert"], dtype=torch.long),
            torch.tensor(d["router_choices_per_expert"], dtype=torch.long),
            torch.tensor(d["dropped_assignments"], dtype=torch.long),
            torch.tensor(d["dropped_tokens"], dtype=torch.long),
            torch.tensor(d["router_entropy_nats"], dtype=torch.float64),
        )

    def table(self) -> str:
        """One markdown row per MoE layer."""
        header = [
            "layer",
            "tokens/expert min / mean / max",
            "max/mean",
            "dropped",
            "router entropy / log E",
            "load entropy / log E",
        ]
        ec = any(r.startswith("expert_choice") for r in self.routers)
        header[3] = "tokens no expert took" if ec else "dropped (tokens / assignments)"
        rows = []
        for i, layer in enumerate(self.layers):
            c = self.counts[i].double()
            d = self.demand[i].double()
            if self.routers[i].startswith("expert_choice"):
                dropped = f"{100 * self.dropped_token_share[i]:.1f}%"
            else:
                dropped = f"{100 * self.dropped_token_share[i]:.1f}% / {100 * self.dropped_assignment_share[i]:.1f}%"
            rows.append(
                [
                    str(layer),
                    f"{c.min():.0f} / {c.mean():.1f} / {c.max():.0f}",
                    f"{d.max() / d.mean().clamp_min(1e-9):.2f}",
                    dropped,
                    f"{self.router_entropy_norm[i]:.3f}",
                    f"{self.load_entropy[i]:.3f}",
                ]
            )
        return markdown_table(header, rows)


class _LoadRecorder:
    """Adds up each MoE block's routing after every forward pass."""

    def __init__(self, model: nn.Module):
        from upcycle.moe.block import moe_blocks

        self.blocks = moe_blocks(model)
        E = {b.num_experts for _, b in self.blocks}
        if len(E) > 1:
            raise ValueError(f"expert load needs the same number of experts in every MoE layer, got {sorted(E)}")
        self.E = E.pop() if E else 0
        L = len(self.blocks)
        self.counts = torch.zeros(L, self.E, dtype=torch.long)
        self.demand = torch.zeros(L, self.E, dtype=torch.long)
        self.dropped_assignments = torch.zeros(L, dtype=torch.long)
        self.dropped_tokens = torch.zeros(L, dtype=torch.long)
        self.entropy_sum = torch.zeros(L, dtype=torch.float64)
        self.tokens = 0

    def record(self) -> None:
        for i, (_, b) in enumerate(self.blocks):
            r = b.last_routing
            self.counts[i] += r.counts_E.cpu()
            if r.topk_idx_TK is not None:
                self.demand[i] += torch.bincount(r.topk_idx_TK.reshape(-1).cpu(), minlength=self.E)
            else:
                self.demand[i] += r.counts_E.cpu()
            self.dropped_assignments[i] += int(r.dropped_assignments)
            self.dropped_tokens[i] += int(r.dropped_tokens)
            self.entropy_sum[i] += float(r.entropy()) * r.num_tokens
        if self.blocks:
            self.tokens += self.blocks[0][1].last_routing.num_tokens

    def result(self) -> ExpertLoad:
        layers = [_layer_index(n, j) for j, (n, _) in enumerate(self.blocks)]
        return ExpertLoad(
            layers,
            [_router_label(b) for _, b in self.blocks],
            self.E,
            self.tokens,
            self.counts,
            self.demand,
            self.dropped_assignments,
            self.dropped_tokens,
            self.entropy_sum / max(self.tokens, 1),
        )


@torch.no_grad()
def perplexity_and_load(model: nn.Module, ids_N: torch.Tensor, context: int = 512) -> tuple[float, ExpertLoad | None]:
    """Perplexity (the `perplexity` protocol) and the expert load of the same forward passes; the load is
    None for a model without MoE layers."""
    rec = _LoadRecorder(model)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for window in _windows(ids_N, context):
        window = window.to(device)
        nll += _nll(model(window).logits, window)
        count += window.shape[1] - 1
        rec.record()
    if count == 0:
        raise ValueError("need at least 2 tokens to score")
    return math.exp(nll / count), (rec.result() if rec.blocks else None)


def expert_load(model: nn.Module, ids_N: torch.Tensor, context: int = 512) -> ExpertLoad:
    """Per-layer, per-expert routing statistics of `model` over `ids_N`, cut into windows of `context`."""
    _, load = perplexity_and_load(model, ids_N, context)
    if load is None:
        raise ValueError("the model has no MoE layers")
    return load
