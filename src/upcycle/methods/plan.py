"""What to do to a dense model, as data.

A plan is a typed, validated dataclass; every field is a YAML key and a CLI flag of the same name
(`num_experts: 8` in YAML is `--num_experts 8` on the command line). Validation happens on
construction, so a plan that exists is a plan that can be applied to a model with enough layers.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upcycle.errors import PlanError
from upcycle.io import yamlio
from upcycle.io.yamlio import option
from upcycle.methods.layers import DEFAULT_LAYERS, parse_layers
from upcycle.moe.routing import EC_CAPACITY_FACTOR

ROUTERS = ("topk", "expert_choice", "soft")
ROUTER_INITS = ("normal", "zeros", "uniform", "data")
EXPERT_INITS = ("copy", "noise", "drop", "partition", "granular", "qwen2")  # see init.py
PARTITION_METHODS = ("random", "kmeans")
SHARED_EXPERTS = ("none", "gated", "ungated")
EC_GROUPS = ("sequence", "batch")
EC_CAUSAL = (
    "Expert choice picks each expert's tokens by comparing all tokens of a group, so a token's "
    "output would depend on later tokens: that breaks causality, and teacher-forced training would "
    "not match one-token-at-a-time generation."
)


@dataclass(frozen=True)
class UpcyclePlan:
    """Sparse upcycling (Komatsuzaki et al., ICLR 2023): MLPs of the chosen layers become MoE layers
    whose experts start as copies of the dense MLP, behind a new router."""

    num_experts: int = option(8, "experts per MoE layer (the paper used 32)")
    layers: str | tuple[int, ...] = option(
        DEFAULT_LAYERS, "which layers: all | every_k:K[:OFFSET] | first_n:N | last_n:N | middle_n:N | 1,3,5"
    )
    router: str | None = option(
        None,
        "routing: topk (token choice) | expert_choice | soft; default: the family's, as "
        "the paper routes: expert_choice in encoders and ViT (T5: its encoder, the decoder "
        "gets topk), topk in decoders",
        choices=ROUTERS,
    )
    top_k: int = option(2, "experts per token for the topk router")
    normalize: bool | None = option(
        None,
        "make each token's combine weights sum to 1 over its selected experts "
        "(topk: renormalised top-k, Mixtral style; expert_choice: 'normalise after routing'); "
        "default: on for topk and expert_choice",
    )
    capacity_factor: float | None = option(
        None,
        "topk: optional token dropping, capacity = ceil(C * tokens * top_k / num_experts) assignments per "
        "expert (default: no dropping); expert_choice: capacity = ceil(C * tokens / num_experts) tokens per "
        "expert (default C = 2)",
    )
    ec_group: str = option(
        "sequence",
        "expert_choice routes within each sequence (capacity from its real, non-"
        "padding tokens; a sequence's output never depends on the rest of the batch) or across the "
        "whole batch (one group; capacity from the batch's real tokens)",
        choices=EC_GROUPS,
    )
    router_init: str = option(
        "normal",
        "router weights: normal (std router_std) | zeros | uniform (std router_std) | "
        "data (mean hidden state entering the layer's MLP on each expert's router_prompts)",
        choices=ROUTER_INITS,
    )
    router_prompts: str | None = option(
        None,
        "router_init=data: YAML list of prompt sets, one per expert (per group of "
        "granularity experts for granular), or a text file of sets separated by ---",
    )
    router_std: float = option(0.02, "standard deviation of the router initialisation")
    expert_init: str = option(
        "copy",
        "experts: copy (of the dense MLP) | noise (copy plus N(0, noise_std) per weight) | "
        "drop (Drop-Upcycling) | partition (LLaMA-MoE neuron split) | granular (virtual groups) "
        "| qwen2 (fine-grained: replicate, permute, slice, re-init); see upcycle.methods.init",
        choices=EXPERT_INITS,
    )
    noise_std: float = option(0.01, "standard deviation of the noise added by expert_init=noise")
    drop_ratio: float = option(
        0.5,
        "drop / qwen2: share of each expert's intermediate neurons re-initialised from the "
        "dense matrix's mean and std (one index set per expert, shared by gate/up/down)",
    )
    partition_method: str = option(
        "random",
        "partition: how the neurons are split into experts: random | kmeans (size-balanced k-means on the gate rows)",
        choices=PARTITION_METHODS,
    )
    partition_scale: float | None = option(
        None,
        "partition: factor folded into the experts' down projections "
        "(default E: each of the top_k active experts gets E/K on average)",
    )
    granularity: int = option(
        1,
        "granular: G, experts of width d_ff/G in virtual groups of G sharing a router row; "
        "qwen2: expert width d_ff/G unless expert_width is given",
    )
    expert_width: int | None = option(None, "qwen2: width of each fine-grained expert (intermediate size)")
    shared_mlp: str = option(
        "none",
        "the dense MLP also as an always-on shared expert: none | gated (Qwen2-MoE "
        "sigmoid gate, zero at init) | ungated (plain sum, DeepSeek style)",
        choices=SHARED_EXPERTS,
    )
    shared_split: float = option(
        0.5,
        "shared_mlp: share of the dense output the routed experts carry at init "
        "(their down projections are scaled by it, the shared expert carries the rest); "
        "0 starts the routed branch at zero",
    )
    aux_loss_coef: float = option(0.01, "load-balancing loss coefficient (alpha)")
    z_loss_coef: float = option(0.0, "router z-loss coefficient (beta)")
    seed: int = option(0, "seed for the router and expert initialisations")
    decoder_router: str | None = option(
        None,
        "router of an encoder-decoder model's decoder (T5): topk | soft; default: topk when router is "
        "expert_choice (a decoder must stay causal), else the same as router",
        choices=ROUTERS,
    )
    decoder_normalize: bool | None = option(
        None, "renormalise the decoder's top-k weights (T5); default: off, as the paper's T5 decoder"
    )

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> PlanError:
            return PlanError(f"{name}: {why}")

        object.__setattr__(self, "layers", parse_layers(self.layers))
        for name in ("num_experts", "top_k", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise bad(name, f"expected an integer, got {v!r}")
        if self.num_experts < 1:
            raise bad("num_experts", f"must be at least 1, got {self.num_experts}")
        if not 0 <= self.seed < 2**63:  # a torch.Generator seed
            raise bad("seed", f"must be between 0 and 2**63 - 1, got {self.seed}")
        if self.router is not None and self.router not in ROUTERS:
            raise bad("router", f"unknown router {self.router!r}; choose one of {', '.join(ROUTERS)}")
        if self.router in (None, "topk") and not 1 <= self.top_k <= self.num_experts:
            raise bad("top_k", f"must be between 1 and num_experts={self.num_experts}, got {self.top_k}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise bad("normalize", f"expected true or false, got {self.normalize!r}")
        if self.router == "soft" and self.normalize is False:
            raise bad("normalize", "the soft router's weights are a softmax over all experts; they always sum to 1")
        if self.capacity_factor is not None:
            c = self.capacity_factor
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
                raise bad("capacity_factor", f"must be a positive number, got {c!r}")
            if self.router == "soft":
                raise bad("capacity_factor", "the soft router sends every token to every expert; it has no capacity")
        if self.decoder_router is not None and self.decoder_router not in ROUTERS:
            raise bad("decoder_router", f"unknown router {self.decoder_router!r}; choose topk or soft")
        if self.decoder_router == "expert_choice":
            raise bad("decoder_router", EC_CAUSAL + " Use decoder_router: topk (the paper's T5 decoder: top-2).")
        if self.decoder_normalize is not None and not isinstance(self.decoder_normalize, bool):
            raise bad("decoder_normalize", f"expected true or false, got {self.decoder_normalize!r}")
        if self.ec_group not in EC_GROUPS:
            raise bad("ec_group", f"choose one of {', '.join(EC_GROUPS)}, got {self.ec_group!r}")
        if self.router_init not in ROUTER_INITS:
            raise bad("router_init", f"choose one of {', '.join(ROUTER_INITS)}, got {self.router_init!r}")
        if self.expert_init not in EXPERT_INITS:
            raise bad("expert_init", f"choose one of {', '.join(EXPERT_INITS)}, got {self.expert_init!r}")
        for name, allowed in (("partition_method", PARTITION_METHODS), ("shared_mlp", SHARED_EXPERTS)):
            if getattr(self, name) not in allowed:
                raise bad(name, f"choose one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("granularity",) + (("expert_width",) if self.expert_width is not None else ()):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, f"expected a positive integer, got {v!r}")
        for name in ("drop_ratio", "shared_split"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise bad(name, f"must be a number between 0 and 1, got {v!r}")
        if self.partition_scale is not None:
            v = self.partition_scale
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise bad("partition_scale", f"must be a positive number, got {v!r}")
        if self.expert_init == "granular" and self.num_experts % self.granularity:
            raise bad(
                "granularity",
                f"num_experts={self.num_experts} must be a multiple of granularity="
                f"{self.granularity} (each virtual group of G experts holds one copy of the MLP)",
            )
        if self.expert_init == "granular" and self.router in (None, "topk") and self.top_k % self.granularity:
            warnings.warn(
                f"granular: top_k={self.top_k} is not a multiple of granularity={self.granularity}: a token "
                "can reach part of a virtual group, so even a group-uniform router cannot reproduce the "
                f"dense MLP; top_k={self.granularity * max(1, self.top_k // self.granularity)} keeps "
                "whole groups",
                stacklevel=3,
            )
        if self.granularity != 1 and self.expert_init not in ("granular", "qwen2"):
            raise bad(
                "granularity", f"only expert_init granular or qwen2 uses it (expert_init is {self.expert_init!r})"
            )
        if self.expert_width is not None and self.expert_init != "qwen2":
            raise bad(
                "expert_width",
                "only expert_init=qwen2 takes an explicit expert width (partition "
                "and granular derive it: d_ff/E, d_ff/G)",
            )
        if (self.router_init == "data") != (self.router_prompts is not None):
            raise bad(
                "router_prompts" if self.router_init == "data" else "router_init",
                "router_init=data and router_prompts go together (the prompts whose hidden states become the "
                "router rows)",
            )
        for name in ("router_std", "noise_std", "aux_loss_coef", "z_loss_coef"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise bad(name, f"must be a non-negative number, got {v!r}")

    # Derived values: one place that says what the defaults mean.
    @property
    def normalize_weights(self) -> bool:
        return True if self.normalize is None else self.normalize

    @property
    def capacity(self) -> float | None:
        if self.router == "expert_choice" and self.capacity_factor is None:
            return EC_CAPACITY_FACTOR
        return self.capacity_factor

    def for_family(self, causal: bool) -> "UpcyclePlan":
        """The plan with the family's router where none was named: expert choice (C = 2, normalised) for a
        model with a non-causal stack (BERT, ViT, T5, whose decoder then gets top-k through for_stack), top-k
        for decoder language models. A named router is kept."""
        if self.router is not None:
            return self
        return dataclasses.replace(self, router="topk" if causal else "expert_choice")

    def for_stack(self, adapter) -> "UpcyclePlan":
        """The plan of one stack of blocks (an `adapters.MLPAdapter`): an encoder-decoder's decoder gets
        decoder_router / decoder_normalize (and no expert-choice capacity); expert choice in any causal
        stack is refused. A plan with no router takes the stack's family default (for_family)."""
        base = self.for_family(adapter.causal and adapter.stack != "decoder")  # T5's decoder: as its encoder
        plan = base
        if adapter.stack == "decoder":
            router = base.decoder_router or ("topk" if base.router == "expert_choice" else base.router)
            normalize = None if router == "soft" else bool(base.decoder_normalize)
            capacity = base.capacity_factor if router == base.router else None
            plan = dataclasses.replace(
                base,
                router=router,
                normalize=normalize,
                capacity_factor=capacity,
                decoder_router=None,
                decoder_normalize=None,
            )
        if adapter.causal and plan.router == "expert_choice":
            raise PlanError(
                f"router: expert_choice cannot route the {adapter.family} layers. {EC_CAUSAL} "
                "Use router: topk for decoders; expert choice is for encoders and ViT "
                "(BERT, ViT, the T5 encoder)."
            )
        return plan

    # Serialisation: YAML keys are the field names.
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in LATER_FIELDS:  # written only when used: plans that do not use them serialise as before
            if d[k] == _DEFAULTS[k]:
                del d[k]
        if isinstance(self.layers, tuple):
            d["layers"] = list(self.layers)
        return {"method": "sparse_upcycling", **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "plan") -> "UpcyclePlan":
        d = dict(d) if isinstance(d, dict) else d
        method = d.pop("method", "sparse_upcycling") if isinstance(d, dict) else None
        if method not in (None, "sparse_upcycling"):
            raise PlanError(f"{source}: method {method!r} is not a sparse upcycling plan")
        yamlio.check_fields(cls, d, source, "plan fields", PlanError)
        d = yamlio.numbers(cls, d, source, PlanError)
        try:
            return cls(**d)
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "UpcyclePlan":
        return cls.from_dict(yamlio.read_mapping(path, "plan file", PlanError), source=str(path))

    def to_yaml(self, path: str | Path | None = None) -> str:
        return yamlio.dump(self.to_dict(), path)

    def replace(self, **changes: Any) -> "UpcyclePlan":
        return dataclasses.replace(self, **changes)


# Fields added after the first release (initialisers of init.py, T5's decoder router): written only when set.
LATER_FIELDS = (
    "router_prompts",
    "drop_ratio",
    "partition_method",
    "partition_scale",
    "granularity",
    "expert_width",
    "shared_mlp",
    "shared_split",
    "decoder_router",
    "decoder_normalize",
)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(UpcyclePlan)}
