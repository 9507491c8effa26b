"""Routers as pure functions of router logits, and the auxiliary losses.

Shape suffixes: T tokens, E experts, K experts per token, A assignments (token, expert pairs that are
computed), S combine slots per token, G routing groups, N tokens per group.

Every router returns a `Routing`: the assignments sorted once by expert (so the experts run one grouped
matmul over contiguous rows), each with a combine weight and a slot, and the statistics callers log.
Router math is fp32 whatever the model dtype. Top-k keeps the number of assignments fixed (T * K) when it
drops some (capacity, padding): the dropped ones sort last under expert id E, count in no expert and are
flagged in `keep_A`, so routing never reads a count back to the host and compiles with fullgraph=True.

Conventions
- Ties go to the lower expert index (top-k) or the lower token index (expert choice): stable sorts.
- Top-k capacity (optional token dropping) counts assignments: cap = ceil(C * T * K / E) per expert,
  the vmoe/Megatron convention; all first choices are served before any second choice (K-major
  priority), in token order. Renormalisation, when on, happens over the top-k set before dropping,
  so a dropped assignment simply contributes 0. With a padding mask, padding tokens get no assignment,
  take no capacity (cap counts the real tokens) and stay out of the load-balancing and z-losses.
- Expert choice capacity counts tokens: c = min(ceil(C * N / E), N) per expert and group.
  With C >= E every expert takes every token. With a padding mask, N is the group's real (non-padding)
  token count, so a short sequence in a padded batch gets the capacity its own length calls for, and
  padding is never picked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The paper's expert-choice capacity factor (C = 2), used when a plan gives none.
EC_CAPACITY_FACTOR = 2.0


_CEIL_TOL = 1e-9  # relative: C * N / E within this of an integer is that integer


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T in fp32, also under autocast (which would otherwise run the matmul in bf16 and round the
    logits, flipping near-tied top-k choices between a bf16 and an fp32 run)."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.nn.functional.linear(x.float(), weight.float())


def ceil_capacity(capacity_factor: float, tokens: int, divisor: int) -> int:
    """ceil(C * tokens / divisor) as the arithmetic means it: in floats 1.1 * 100 / 2 is 55.000000000000007,
    whose plain ceil is 56; products within _CEIL_TOL (relative) of an integer count as that integer."""
    x = capacity_factor * tokens / divisor
    return math.ceil(x - _CEIL_TOL * max(1.0, abs(x)))


def _ceil_capacity_t(capacity_factor: float, tokens: torch.Tensor, divisor: int) -> torch.Tensor:
    """`ceil_capacity` for token counts held on the device (padding masks): same tolerance, no host read."""
    x = capacity_factor * tokens.double() / divisor
    return torch.ceil(x - _CEIL_TOL * x.clamp(min=1.0)).long()


def ec_tokens_per_expert(capacity_factor: float, tokens: int, num_experts: int) -> int:
    """Expert choice: tokens each expert takes from a group of `tokens`, min(ceil(C * N / E), N)."""
    return min(ceil_capacity(capacity_factor, tokens, num_experts), tokens)


@dataclass
class Routing:
    expert_A: torch.Tensor  # (A,) int64, sorted ascending
    token_A: torch.Tensor  # (A,) int64, token each assignment reads
    slot_A: torch.Tensor  # (A,) int64, row of the (T*S, D) combine buffer it writes
    weight_A: torch.Tensor  # (A,) fp32 combine weight
    counts_E: torch.Tensor  # (E,) int64, assignments per expert
    slots_per_token: int  # S
    logits_TE: torch.Tensor  # (T, E) fp32, for the aux losses
    probs_TE: torch.Tensor  # (T, E) fp32
    topk_idx_TK: torch.Tensor | None  # token-choice selection before dropping (load-balancing loss)
    dropped_assignments: torch.Tensor  # () int64
    dropped_tokens: torch.Tensor  # () int64: tokens no expert processed
    real_tokens: torch.Tensor | None = None  # () int64: non-padding tokens, where a padding mask was given
    mask_T: torch.Tensor | None = None  # (T,) bool, True for real tokens, where a padding mask was given
    # (A,) bool, False for assignments that are not computed (dropped by capacity, padding: they sort last,
    # under expert id E, and count in no expert); None when every assignment is computed
    keep_A: torch.Tensor | None = None

    def kept(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(expert_A, token_A, slot_A, weight_A) of the computed assignments only (for inspection: a boolean
        index, so a host read on CUDA)."""
        arrays = (self.expert_A, self.token_A, self.slot_A, self.weight_A)
        return arrays if self.keep_A is None else tuple(a[self.keep_A] for a in arrays)

    @property
    def num_tokens(self) -> int:
        return self.probs_TE.shape[0]

    def entropy(self) -> torch.Tensor:
        """Mean per-token entropy of the router distribution over the real tokens, in nats (log E = uniform)."""
        p = self.probs_TE.detach()
        h_T = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
        return _masked_mean(h_T, self.mask_T)


def _masked_mean(x_T: torch.Tensor, mask_T: torch.Tensor | None) -> torch.Tensor:
    """Mean over the tokens whose mask is True (all tokens without a mask); 0 when there are none."""
    if mask_T is None:
        return x_T.mean()
    m = mask_T.to(x_T.dtype)
    return (x_T * m).sum() / m.sum().clamp_min(1)


def _counts_sorted(expert_sorted: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert from expert ids in ascending order. Unlike bincount, the output size does
    not depend on the data, so there is no device-to-host read on CUDA and it traces under compile."""
    edges = torch.arange(num_experts + 1, device=expert_sorted.device, dtype=expert_sorted.dtype)
    pos = torch.searchsorted(expert_sorted, edges)
    return pos[1:] - pos[:-1]


def _sorted_by_expert(expert_A, *arrays, num_experts):
    """expert_A and the per-assignment `arrays` (None stays None) in expert order, and the counts of experts
    0..num_experts-1 (ids of num_experts or more sort last and count in none)."""
    order = torch.argsort(expert_A, stable=True)
    expert_A = expert_A[order]
    return (expert_A, *(None if a is None else a[order] for a in arrays), _counts_sorted(expert_A, num_experts))


def _rank_within_expert(expert_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Position of each assignment among the assignments to the same expert, in the given order."""
    order = torch.argsort(expert_A, stable=True)
    counts = _counts_sorted(expert_A[order], num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(expert_A)
    rank[order] = torch.arange(expert_A.numel(), device=expert_A.device) - starts[expert_A[order]]
    return rank


def topk_route(
    logits_TE: torch.Tensor,
    k: int,
    normalize: bool = True,
    capacity_factor: float | None = None,
    mask_T: torch.Tensor | None = None,
) -> Routing:
    """Token choice: each token picks its k most probable experts.

    normalize=False: w_e = p_e (Switch / softmax-then-top-k); normalize=True: w_e = p_e / sum_topk p
    (Mixtral). With capacity_factor set, assignments past an expert's capacity are dropped (see module doc).
    mask_T (bool, True = real token): padding tokens get no assignment (their output is 0) and take no capacity;
    the capacity counts real tokens only.
    """
    logits_TE = logits_TE.float()
    T, E = logits_TE.shape
    probs_TE = torch.softmax(logits_TE, dim=-1)
    # Stable descending sort: equal probabilities keep index order, so ties go to the lower expert.
    sorted_p_TE, sorted_idx_TE = torch.sort(probs_TE, dim=-1, descending=True, stable=True)
    w_TK, idx_TK = sorted_p_TE[:, :k], sorted_idx_TE[:, :k]
    if normalize:
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)

    expert_A = idx_TK.reshape(-1)
    token_A = torch.arange(T, device=logits_TE.device).repeat_interleave(k)
    slot_A = torch.arange(T * k, device=logits_TE.device)
    weight_A = w_TK.reshape(-1)
    dropped_assignments = torch.zeros((), dtype=torch.long, device=logits_TE.device)
    dropped_tokens = torch.zeros((), dtype=torch.long, device=logits_TE.device)
    real_tokens = None
    if mask_T is not None:
        mask_T = mask_T.reshape(-1).to(device=logits_TE.device, dtype=torch.bool)
        if mask_T.shape[0] != T:
            raise ValueError(f"padding mask has {mask_T.shape[0]} tokens, the router logits {T}")
        real_tokens = mask_T.sum()
    real_A = None if mask_T is None else mask_T.repeat_interleave(k)  # assignments of real tokens
    keep_A = real_A
    if capacity_factor is not None:
        # K-major order: every token's first choice before any second choice; padding in a bucket of its own.
        expert_KT = idx_TK.t().reshape(-1)
        if mask_T is None:
            cap = ceil_capacity(capacity_factor, T * k, E)
            keep_KT = _rank_within_expert(expert_KT, E) < cap
        else:
            cap = _ceil_capacity_t(capacity_factor, real_tokens * k, E)
            expert_KT = torch.where(mask_T.repeat(k), expert_KT, E)
            keep_KT = _rank_within_expert(expert_KT, E + 1) < cap
        keep_cap_A = keep_KT.view(k, T).t().reshape(-1)
        keep_A = keep_cap_A if keep_A is None else keep_A & keep_cap_A
    if keep_A is not None:
        if real_A is None:
            real_A = torch.ones_like(keep_A)
        dropped_assignments = (real_A & ~keep_A).sum()
        dropped_tokens = (real_A.view(T, k).any(dim=1) & ~keep_A.view(T, k).any(dim=1)).sum()
        expert_A = torch.where(keep_A, expert_A, E)  # not computed: after every expert, in no count

    expert_A, token_A, slot_A, weight_A, keep_A, counts_E = _sorted_by_expert(
        expert_A, token_A, slot_A, weight_A, keep_A, num_experts=E
    )
    return Routing(
        expert_A,
        token_A,
        slot_A,
        weight_A,
        counts_E,
        k,
        logits_TE,
        probs_TE,
        idx_TK,
        dropped_assignments,
        dropped_tokens,
        real_tokens,
        mask_T,
        keep_A,
    )


def soft_route(logits_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> Routing:
    """Every token uses every expert, weighted by the softmax over experts (BTX 'soft', BAM attention);
    padding tokens (mask_T False) none."""
    return topk_route(logits_TE, logits_TE.shape[-1], normalize=False, mask_T=mask_T)


def expert_choice_route(
    logits_GNE: torch.Tensor,
    capacity_factor: float = EC_CAPACITY_FACTOR,
    normalize: bool = True,
    mask_GN: torch.Tensor | None = None,
) -> Routing:
    """Expert choice (Zhou et al. 2022): within each group of N tokens, each expert picks its
    c = min(ceil(C*N/E), N) highest-probability tokens; weights are the router probabilities.

    Not causal: a token's experts depend on the other tokens of its group; use it in encoders.
    normalize=True divides each token's weights by their sum over the experts that picked it
    (Sparse Upcycling's 'normalise after routing'). Tokens with mask False are never picked.
    Tokens are numbered g * N + n in the returned routing. With a mask, each group's capacity counts
    its real tokens (module doc).
    """
    logits_GNE = logits_GNE.float()
    G, N, E = logits_GNE.shape
    device = logits_GNE.device
    probs_GNE = torch.softmax(logits_GNE, dim=-1)
    c = ec_tokens_per_expert(capacity_factor, N, E)
    score_GEN = probs_GNE.transpose(1, 2)
    if mask_GN is not None:
        score_GEN = score_GEN.masked_fill(~mask_GN[:, None, :], -1.0)  # below every probability
    # Stable sort over tokens: ties go to the lower token index.
    _, idx_GEN = torch.sort(score_GEN, dim=-1, descending=True, stable=True)
    tok_GEc = idx_GEN[..., :c]
    gate_GEc = torch.gather(probs_GNE.transpose(1, 2), -1, tok_GEc)
    if mask_GN is not None:  # per-group capacity from the real tokens; padding sorts last and is cut
        cap_G = _ceil_capacity_t(capacity_factor, mask_GN.sum(-1), E).clamp(max=N)
        keep_GEc = (torch.arange(c, device=device).view(1, 1, c) < cap_G.view(G, 1, 1)) & torch.gather(
            mask_GN[:, None, :].expand(G, E, N), -1, tok_GEc
        )

    expert_GEc = torch.arange(E, device=device).view(1, E, 1).expand(G, E, c)
    token_GEc = tok_GEc + (torch.arange(G, device=device) * N).view(G, 1, 1)
    # Expert-major order (E, G, c): the assignments of each expert are contiguous.
    expert_A = expert_GEc.transpose(0, 1).reshape(-1)
    token_A = token_GEc.transpose(0, 1).reshape(-1)
    weight_A = gate_GEc.transpose(0, 1).reshape(-1)
    if mask_GN is not None:
        keep_A = keep_GEc.transpose(0, 1).reshape(-1)
        expert_A, token_A, weight_A = expert_A[keep_A], token_A[keep_A], weight_A[keep_A]
    T = G * N
    picked_T = torch.zeros(T, dtype=torch.bool, device=device)
    picked_T[token_A] = True
    slot_A = token_A * E + expert_A  # row of the (T * E, D) combine buffer: one per (token, expert)
    if normalize:  # each token's weights over the experts that took it; summed in a (T, E) buffer, which keeps
        # the sum deterministic (index_add would use atomics on CUDA)
        total_T = weight_A.new_zeros(T * E).index_copy(0, slot_A, weight_A).view(T, E).sum(-1)
        weight_A = weight_A / total_T[token_A]
    real_T = mask_GN.reshape(-1) if mask_GN is not None else torch.ones_like(picked_T)
    dropped_tokens = (real_T & ~picked_T).sum()
    expert_A, token_A, slot_A, weight_A, counts_E = _sorted_by_expert(
        expert_A, token_A, slot_A, weight_A, num_experts=E
    )
    return Routing(
        expert_A,
        token_A,
        slot_A,
        weight_A,
        counts_E,
        E,
        logits_GNE.reshape(T, E),
        probs_GNE.reshape(T, E),
        None,
        torch.zeros((), dtype=torch.long, device=device),
        dropped_tokens,
        None if mask_GN is None else real_T.sum(),
        None if mask_GN is None else real_T,
    )


def load_balancing_loss(
    probs_TE: torch.Tensor, idx_TK: torch.Tensor, mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eqs. 4-6) as flaxformer computes it
    for top-k: L = E * sum_e f_e * P_e, where f_e is the fraction of tokens whose top-k set contains
    expert e (so sum_e f_e = K) and P_e the mean router probability of e. Perfect balance gives K;
    gradients reach the router through P_e. With mask_T, both are over the real tokens only."""
    T, E = probs_TE.shape
    if mask_T is None:
        f_E = probs_TE.new_zeros(E).index_add(0, idx_TK.reshape(-1), probs_TE.new_ones(idx_TK.numel())) / T
        P_E = probs_TE.mean(dim=0)
    else:  # the same over the real tokens
        w_T = mask_T.to(probs_TE.dtype)
        n = w_T.sum().clamp_min(1)
        f_E = probs_TE.new_zeros(E).index_add(0, idx_TK.reshape(-1), w_T.repeat_interleave(idx_TK.shape[1])) / n
        P_E = (probs_TE * w_T[:, None]).sum(0) / n
    return E * (f_E * P_E).sum()


def z_loss(logits_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): mean over (real) tokens of logsumexp(z)^2."""
    return _masked_mean(torch.logsumexp(logits_TE.float(), dim=-1).square(), mask_T)
