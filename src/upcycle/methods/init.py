"""Expert and router initialisers: pure functions of one layer's dense MLP tensors.

    init_layer(plan, layer, dense, act) -> {"experts.gate_proj": (E, Fe, D), "experts.up_proj": (E, Fe, D),
                                            "experts.down_proj": (E, D, Fe), [biases], "router.weight": (E, D),
                                            ["shared_expert.{gate_proj,up_proj,down_proj,gate}.weight"]}

`dense` holds the dense MLP as {"gate": (F, D), "up": (F, D), "down": (D, F)} plus optional "gate_bias",
"up_bias", "down_bias". Every random draw comes from a generator seeded by (plan.seed, layer, stream), so a
layer's tensors do not depend on the order they are built in, nor on the other layers: the in-memory surgery
and the streaming converter get the same bytes. Arithmetic is fp32; results are cast to the dense dtype.

expert_init (E = num_experts, F = dense intermediate size, K = top_k):
  copy       every expert is the dense MLP (Komatsuzaki et al. 2023). With renormalised top-k the layer is
             the dense MLP exactly.
  noise      copy plus independent N(0, noise_std^2) per weight (OLMoE; Drop-Upcycling's baseline).
  drop       Drop-Upcycling (Nakamura et al., ICLR 2025): copy, then per expert re-draw a share `drop_ratio`
             (floor(r F) neurons) of the intermediate neurons: those rows of gate/up and columns of down get
             values from N(mean, std) of the whole original matrix (biases of those neurons: N(mean, std) of
             the original bias vector). Index-set convention: ONE set S_e per expert, shared by gate, up and
             down, as the paper describes (the released code draws a set per matrix); the sets of different
             experts are independent. The other (1 - r) F neurons of each expert are the dense ones, intact.
  partition  LLaMA-MoE neuron partitioning: the F neurons split into E disjoint sets of F/E (random: a
             seeded permutation; kmeans: size-balanced k-means on the L2-normalised gate rows, up rows for
             ungated MLPs); expert e = (gate[S_e], up[S_e], down[:, S_e]), so the sum of all experts is the
             dense MLP. An output factor (partition_scale, default E for renormalised/soft weights, E^2/K
             for unnormalised top-k: the factor that makes K = E exact; LLaMA-MoE's own recipe multiplies
             its top-K scores by E/K, which is partition_scale = E/K here) is folded into the down
             projections: a linear map, so the block and stock exports need no extra multiplier. With K = E,
             a zero router and renormalised weights (1/E each) the layer is the dense MLP exactly.
  granular   virtual-group upcycling (He et al. 2024, arXiv 2410.07524; Megatron --moe-upcycling-granularity
             G): experts of width F/G, expert i holds shard (i mod G), the G consecutive experts of a group
             share one router row, so top-G always picks one whole copy of the MLP. Every matrix (and the
             gate/up biases) is scaled by s^(1/p): s = G for renormalised top-k (and soft / expert choice),
             s = (E/G) G^2 / K = E G / K for unnormalised top-k (softmax then top-k); p is the degree of
             homogeneity of the MLP: 1 per matrix plus the activation's degree (relu2: 2, others 1), plus 1
             for a gated MLP. That is Megatron's 1/3 for SwiGLU and ReLU^2, 1/2 for GeLU, and 1/4 for a gated
             ReLU^2 (where 1/3 would be off by s^(1/3)). Exact where the activation is homogeneous (relu,
             relu2), approximate for silu/gelu (tests pin the figure).
  qwen2      Qwen2 fine-grained upcycling (Qwen2 report 2.2.2): replicate the MLP ceil(E h / F) times, permute
             each copy's intermediate dimension (its own seeded permutation), cut E experts of width h =
             expert_width (default F / granularity) from the concatenation (a slice straddling two copies
             takes distinct neurons: no neuron twice in one expert), discard the rest,
             then re-initialise a share drop_ratio (default 0.5) of each expert's neurons as `drop` does.

shared_mlp (none | gated | ungated): the dense MLP also becomes an always-on shared expert beside the
  routed ones (gated: Qwen2-MoE's sigmoid(x w) gate, w = 0 at init so the gate is 1/2; ungated: DeepSeek
  style, plain sum). Function preservation: the routed experts' down projections are scaled by
  shared_split (default 1/2) and the shared expert's output carries 1 - shared_split of the dense MLP, so
  whenever the routed branch alone reproduces the dense MLP (copy, partition with all experts active,
  granular ReLU^2) the layer does too; shared_split = 0 starts the routed branch at zero, which preserves
  the function whatever the routed initialiser (their gate/up keep the initialiser's values; down gets a
  gradient from the first step).

router_init: normal / uniform (std router_std) / zeros, or data: row e = the mean of the hidden states
  entering the MoE layer's MLP (after the block's norm, what the router sees) over the tokens of prompt
  set e, centred on the mean over the sets and rescaled to the norm of a normal(0, router_std) row
  (router_std * sqrt(D)). mergekit's `hidden` mode takes the residual stream entering the layer (not the
  router's input), the last token only, and unit rows (logits of the size of the hidden state: a saturated
  softmax at init). Centring changes no routing decision (it shifts every logit of a token by the same
  amount); it makes the rows' norms, hence the scale, mean something. Granular plans take one prompt set per
  group of G experts."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from upcycle.errors import PlanError
from upcycle.methods.routers import _generator, router_weight

if TYPE_CHECKING:  # a plan at run time is an UpcyclePlan (BamPlan hands over its ffn_plan())
    from upcycle.methods.plan import UpcyclePlan

# Degree of homogeneity of activations: act(c x) = c^deg act(x) for c > 0 (exact for relu/relu2; silu and
# gelu behave like degree 1 for large inputs, which is what the virtual-group scale assumes).
ACT_DEGREE = {"relu2": 2}


# The dense MLP tensors, in the order that numbers their noise streams (surgery._EXPERT_PARAMS's order).
_TENSORS = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")


# Generator streams (see `_generator`): 0 router, 1-6 noise per tensor (as before this module existed).
_S_DROP_SETS, _S_DROP_VALUES, _S_PARTITION, _S_QWEN2_PERM = 10, 20, 30, 40


def expert_intermediate_size(plan: UpcyclePlan, F: int) -> int:
    """Width of one routed expert for a dense MLP of width F (checks the divisibility the plan needs)."""
    kind, E = plan.expert_init, plan.num_experts
    if kind == "partition":
        if F % E:
            raise PlanError(
                f"expert_init=partition: the intermediate size {F} does not split into "
                f"num_experts={E} equal parts; choose num_experts dividing {F}"
            )
        return F // E
    if kind == "granular":
        G = plan.granularity
        if F % G:
            raise PlanError(f"expert_init=granular: the intermediate size {F} is not a multiple of granularity={G}")
        return F // G
    if kind == "qwen2":
        h = plan.expert_width or F // plan.granularity
        if plan.expert_width is None and F % plan.granularity:
            raise PlanError(
                f"expert_init=qwen2: the intermediate size {F} is not a multiple of granularity="
                f"{plan.granularity}; give expert_width"
            )
        if not 1 <= h <= F:
            raise PlanError(f"expert_init=qwen2: expert_width must be between 1 and {F}, got {h}")
        return h
    return F


def _distinct_slices(idx: torch.Tensor, E: int, h: int) -> list[torch.Tensor]:
    """Slices idx[e h:(e + 1) h] of the concatenated permutations, each made of distinct neurons: a slice that
    straddles two copies can meet a neuron twice (when h does not divide F), and two identical neurons in
    one expert would get identical gradients for ever; a repeat is replaced by the next neurons of idx (from
    the slice's end on, wrapping round) that the slice lacks. Where h divides F no slice straddles, so this
    is the plain slicing."""
    flat = idx.tolist()
    out = []
    for e in range(E):
        chosen = list(dict.fromkeys(flat[e * h : (e + 1) * h]))
        if len(chosen) < h:
            have = set(chosen)
            for i in flat[(e + 1) * h :] + flat[: e * h]:
                if i not in have:
                    have.add(i)
                    chosen.append(i)
                    if len(chosen) == h:
                        break
        out.append(torch.tensor(chosen, dtype=idx.dtype))
    return out


def plan_structure(plan: UpcyclePlan, F: int) -> dict:
    """The block shape the plan gives a dense MLP of width F, in `surgery.make_moe_block`'s terms."""
    out: dict = {}
    Fe = expert_intermediate_size(plan, F)
    if Fe != F:
        out["expert_intermediate_size"] = Fe
    if plan.shared_mlp != "none":
        out["shared_expert"] = {"intermediate_size": F, "gated": plan.shared_mlp == "gated"}
    return out


def _topk_unnormalised(plan: UpcyclePlan) -> bool:
    """Top-k weights that are not renormalised (each active expert carries p_e ~ 1/E). Surgery hands the
    initialisers plans with the family's router resolved; a plan that names none is read as the decoder
    default, top-k."""
    return plan.router in (None, "topk") and not plan.normalize_weights


def granular_scale(plan: UpcyclePlan, act: str, gated: bool) -> float:
    """Per-matrix factor of virtual-group upcycling, s^(1/p) (module docstring)."""
    G, E, K = plan.granularity, plan.num_experts, plan.top_k
    s = float(E * G / K) if _topk_unnormalised(plan) else float(G)
    p = 1 + ACT_DEGREE.get(act, 1) + (1 if gated else 0)
    return s ** (1.0 / p)


def partition_scale(plan: UpcyclePlan) -> float:
    if plan.partition_scale is not None:
        return float(plan.partition_scale)
    E, K = plan.num_experts, plan.top_k
    if _topk_unnormalised(plan):
        return E * E / K
    return float(E)


def _stats_normal(ref: torch.Tensor, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    ref = ref.float()
    std = ref.std().item() if ref.numel() > 1 else 0.0
    return torch.randn(shape, generator=g) * std + ref.mean().item()


def _reinit_neurons(
    out: dict[str, torch.Tensor], src: dict[str, torch.Tensor], sets: list[torch.Tensor], plan, layer: int
) -> None:
    """In place: neurons sets[e] of expert e get N(mean, std) of the dense tensors in `src` (rows of
    gate/up and their biases, columns of down)."""
    n = len(sets[0]) if sets else 0
    if n == 0:
        return
    E = len(sets)
    for j, name in enumerate(("gate", "up", "down", "gate_bias", "up_bias")):
        if name not in out:
            continue
        g = _generator(plan.seed, layer, _S_DROP_VALUES + j)
        t = out[name]
        if name == "down":
            vals = _stats_normal(src[name], (E, t.shape[1], n), g)
            for e in range(E):
                t[e][:, sets[e]] = vals[e]
        else:
            vals = _stats_normal(src[name], (E, n) + tuple(t.shape[2:]), g)
            for e in range(E):
                t[e][sets[e]] = vals[e]


def drop_sets(plan: UpcyclePlan, layer: int, E: int, width: int) -> list[torch.Tensor]:
    """One index set per expert, floor(r * width) neurons, sorted."""
    n = int(math.floor(plan.drop_ratio * width))
    g = _generator(plan.seed, layer, _S_DROP_SETS)
    return [torch.randperm(width, generator=g)[:n].sort().values for _ in range(E)]


def _balanced_kmeans(x: torch.Tensor, k: int, g: torch.Generator, iters: int = 20) -> torch.Tensor:
    """Labels (N,) with exactly N/k points per cluster: k-means (L2) whose assignment step fills the clusters
    greedily, most confident (point, centre) pairs first, each cluster up to N/k points."""
    N = x.shape[0]
    cap = N // k
    centres = x[torch.randperm(N, generator=g)[:k]].clone()
    labels = torch.empty(N, dtype=torch.long)
    for _ in range(iters):
        d = torch.cdist(x, centres)  # (N, k)
        order = torch.argsort(d.reshape(-1), stable=True)
        labels.fill_(-1)
        fill = [0] * k
        left = N
        for flat in order.tolist():
            i, c = divmod(flat, k)
            if labels[i] >= 0 or fill[c] >= cap:
                continue
            labels[i] = c
            fill[c] += 1
            left -= 1
            if left == 0:
                break
        new = torch.stack([x[labels == c].mean(0) for c in range(k)])
        if torch.allclose(new, centres):
            break
        centres = new
    return labels


def partition_sets(plan: UpcyclePlan, layer: int, dense: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """E disjoint, sorted index sets of F/E neurons covering 0..F-1."""
    E = plan.num_experts
    F = dense["up"].shape[0]
    expert_intermediate_size(plan, F)  # divisibility
    g = _generator(plan.seed, layer, _S_PARTITION)
    if plan.partition_method == "random":
        perm = torch.randperm(F, generator=g)
        return [c.sort().values for c in perm.view(E, F // E)]
    rows = dense["gate"] if "gate" in dense else dense["up"]
    x = torch.nn.functional.normalize(rows.float(), dim=1)
    labels = _balanced_kmeans(x, E, g)
    return [torch.nonzero(labels == e).flatten() for e in range(E)]


def _gather(dense: dict[str, torch.Tensor], sets: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """(E, ...) stacks of neurons sets[e] of each dense tensor (down: columns), fp32."""
    out = {}
    for name, t in dense.items():
        t = t.float()
        if name == "down":
            out[name] = torch.stack([t[:, s] for s in sets])
        elif name == "down_bias":
            out[name] = t.unsqueeze(0).expand(len(sets), *t.shape).clone()
        else:
            out[name] = torch.stack([t[s] for s in sets])
    return out


def init_layer(
    plan, layer: int, dense: dict[str, torch.Tensor], act: str, data_rows: dict[int, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """One MoE block's tensors (names relative to the block) from one dense MLP. See the module docstring."""
    dtype = dense["up"].dtype
    F, D = dense["up"].shape
    E, kind = plan.num_experts, plan.expert_init
    gated = "gate" in dense
    names = [n for n in _TENSORS if n in dense]
    if kind in ("copy", "noise"):
        experts = {n: init_experts(plan, layer, dense[n], _TENSORS.index(n)) for n in names}
    elif kind == "drop":
        experts = {n: dense[n].float().unsqueeze(0).expand(E, *dense[n].shape).clone() for n in names}
        _reinit_neurons(experts, dense, drop_sets(plan, layer, E, F), plan, layer)
    elif kind == "partition":
        experts = _gather(dense, partition_sets(plan, layer, dense))
        c = partition_scale(plan)
        experts["down"] = experts["down"] * c  # the down bias stays whole: the combine weights sum to 1
    elif kind == "granular":
        G = plan.granularity
        w = expert_intermediate_size(plan, F)
        shards = [torch.arange(s * w, (s + 1) * w) for s in range(G)]
        experts = _gather(dense, [shards[i % G] for i in range(E)])
        c = granular_scale(plan, act, gated)
        for n in names:
            if n != "down_bias":
                experts[n] = experts[n] * c
    elif kind == "qwen2":
        h = expert_intermediate_size(plan, F)
        copies = -(-E * h // F)
        g = _generator(plan.seed, layer, _S_QWEN2_PERM)
        idx = torch.cat([torch.randperm(F, generator=g) for _ in range(copies)])
        experts = _gather(dense, _distinct_slices(idx, E, h))
        _reinit_neurons(experts, dense, drop_sets(plan, layer, E, h), plan, layer)
    else:
        raise PlanError(f"unknown expert_init {kind!r}")

    out: dict[str, torch.Tensor] = {}
    split = plan.shared_split if plan.shared_mlp != "none" else 1.0
    for n in names:
        t = experts[n]
        if split != 1.0 and n in ("down", "down_bias"):
            t = t.float() * split
        moe_name = n + "_proj" if not n.endswith("_bias") else n
        out[f"experts.{moe_name}"] = t.to(dtype)
    out["router.weight"] = router_weight(plan, layer, D, dtype, data_rows)
    if plan.shared_mlp != "none":
        if any(n.endswith("_bias") for n in names):
            raise PlanError("shared_mlp: the MLPs have biases, which the shared expert does not carry")
        if not gated:
            raise PlanError("shared_mlp: the shared expert is a gated MLP; this model's MLP is not")
        rest = (1.0 - plan.shared_split) * (2.0 if plan.shared_mlp == "gated" else 1.0)  # sigmoid(0) = 1/2
        out["shared_expert.gate_proj.weight"] = dense["gate"].clone()
        out["shared_expert.up_proj.weight"] = dense["up"].clone()
        out["shared_expert.down_proj.weight"] = (dense["down"].float() * rest).to(dtype)
        if plan.shared_mlp == "gated":
            out["shared_expert.gate.weight"] = torch.zeros(1, D, dtype=dtype)
    return out


def init_experts(plan: UpcyclePlan, layer: int, dense: torch.Tensor, which: int) -> torch.Tensor:
    """(E, ...) expert tensor from one dense tensor: copies, or copies plus independent noise (`which`:
    the tensor's index in surgery._EXPERT_PARAMS, which picks its noise stream)."""
    out = dense.unsqueeze(0).expand(plan.num_experts, *dense.shape).clone()
    if plan.expert_init == "noise" and plan.noise_std > 0:
        g = _generator(plan.seed, layer, 1 + which)
        noise = torch.randn(out.shape, generator=g, dtype=torch.float32) * plan.noise_std
        out = (out.float() + noise).to(dense.dtype)
    return out
