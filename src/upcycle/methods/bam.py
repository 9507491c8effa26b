"""Several dense models -> one MoE model: BAM (Branch-Attend-Mix, Zhang et al. 2024, arXiv 2408.08274)
and BTX (Branch-Train-MiX, Sukhbaatar et al. 2024, arXiv 2403.07816).

Inputs are N dense models of one architecture and tokenizer, usually branched from one seed (the seed
itself included as the general expert). In every layer:

    FFN       expert i = model i's MLP, behind a new router (normal(0, router_std));
              BAM: top-1, softmax over all experts, NOT renormalised (w = p_top); BTX: top-2 renormalised
    attention BAM: N attention experts with a soft router (`attention.MoAttention`), kv="experts"
              (own Wq, Wk, Wv, Wo) or kv="shared" (Wk, Wv = the mean of the models'); BTX: the mean
    the rest  embeddings, norms, LM head: the uniform mean of the N models
    losses    load balancing (alpha) + z-loss (beta) on the FFN routers; none on the soft attention router

The block layout is the host architecture's: a parallel-attention family (Cohere: y = x + Attn(LN x) +
MLP(LN x), one norm) gives the BAM block; a sequential family (Llama, SmolLM2) keeps its sequential
block, which `mix` says in its log.

`mix_state_dicts` is the pure part ((N state dicts, config, plan) -> mixed state dict); `convert_structure`
swaps the modules of a model for empty MoE / MoA modules of the right shape; `mix` puts them together."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from upcycle.adapters import ADAPTERS, adapter_for
from upcycle.errors import PlanError, UpcycleError
from upcycle.io import yamlio
from upcycle.io.yamlio import option
from upcycle.methods.record import ConversionRecord

METHODS = ("bam", "btx")


KV = ("experts", "shared", "averaged")


PARALLEL_BLOCK_TYPES = ("cohere",)  # y = x + Attn(LN x) + MLP(LN x)


@dataclass(frozen=True)
class BamPlan:
    """How N dense models are mixed. `for_method` fills the method's defaults."""

    method: str = option("bam", "bam | btx", choices=METHODS)
    num_experts: int = option(2, "N: the number of dense models mixed (one FFN and attention expert each)")
    kv: str = option(
        "experts", "attention: experts (own Wq,Wk,Wv,Wo) | shared (Wk,Wv averaged) | averaged (BTX)", choices=KV
    )
    top_k: int = option(1, "FFN experts per token")
    normalize: bool = option(False, "renormalise the top-k FFN weights to sum to 1 (BTX) or not (BAM)")
    aux_loss_coef: float = option(0.01, "FFN load-balancing coefficient alpha")
    z_loss_coef: float = option(0.001, "FFN router z-loss coefficient beta")
    router_std: float = option(0.02, "standard deviation of the new routers (FFN and attention)")
    seed: int = option(0, "seed of the router initialisation")
    layers: str = option("all", "mixed layers: all of them (BAM and BTX mix every layer)")

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> PlanError:
            return PlanError(f"{name}: {why}")

        if self.method not in METHODS:
            raise bad("method", f"choose one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("num_experts", "top_k", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise bad(name, f"expected an integer, got {v!r}")
        if self.num_experts < 2:
            raise bad("num_experts", f"mixing needs at least 2 dense models, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise bad("top_k", f"must be between 1 and num_experts={self.num_experts}, got {self.top_k}")
        if self.method == "bam" and self.kv not in ("experts", "shared"):
            raise bad(
                "kv", f"BAM's attention experts keep their own K/V (experts) or share them (shared), got {self.kv!r}"
            )
        if self.method == "btx" and self.kv != "averaged":
            raise bad("kv", f"BTX averages the attention; kv must be 'averaged', got {self.kv!r}")
        if self.layers != "all":
            raise bad("layers", f"BAM and BTX mix every layer; got {self.layers!r}")
        for name in ("aux_loss_coef", "z_loss_coef", "router_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise bad(name, f"must be a non-negative number, got {v!r}")

    @classmethod
    def for_method(cls, method: str, num_experts: int, **overrides: Any) -> "BamPlan":
        """BAM: kv experts, top-1 unnormalised, alpha 0.01, beta 0.001; BTX: averaged attention, top-2
        renormalised, alpha 0.01, no z-loss. None values in overrides keep the default."""
        base = (
            {"kv": "experts", "top_k": 1, "normalize": False, "z_loss_coef": 0.001}
            if method == "bam"
            else {"kv": "averaged", "top_k": min(2, num_experts), "normalize": True, "z_loss_coef": 0.0}
        )
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(method=method, num_experts=num_experts, **base)

    # BAM and BTX route their FFN experts top-k: a fact of the method (surgery.applied_plan reads it and
    # leaves a plan that names its router as it is), not a field a plan file sets.
    router = "topk"

    def ffn_plan(self):
        """The FFN side as the sparse-upcycling plan it is: N full-width experts (the models' own FFNs,
        copied) behind a top-k router, normalised or not. The MoE blocks are built from this, so a
        BamPlan never has to pass for an UpcyclePlan."""
        from upcycle.methods.plan import UpcyclePlan

        return UpcyclePlan(
            num_experts=self.num_experts, top_k=self.top_k, router="topk", normalize=self.normalize, seed=self.seed
        )

    @property
    def attention_experts(self) -> bool:
        return self.method == "bam"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "plan") -> "BamPlan":
        yamlio.check_fields(cls, dict(d), source, "plan fields", PlanError)
        d = yamlio.numbers(cls, d, source, PlanError)
        try:
            return cls(**d)
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None

    def replace(self, **changes: Any) -> "BamPlan":
        return dataclasses.replace(self, **changes)


_SHAPE_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "hidden_act",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "use_qk_norm",
    # not shapes, but the mixed model computes with one config: models that differ here would be
    # mixed silently with the first one's positions, norms or attention window
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "rms_norm_eps",
    "layer_norm_eps",
    "sliding_window",
    "logit_scale",
)


def check_compatible(
    configs: Sequence[Any],
    states: Sequence[dict[str, torch.Tensor]],
    names: Sequence[str],
    tokenizer_hashes: Sequence[str | None] | None = None,
) -> None:
    """Raise UpcycleError naming the first model (and key) that differs from the first one in
    architecture, tensor names or shapes, or tokenizer."""
    if len(configs) < 2:
        raise UpcycleError(f"mixing needs at least 2 dense models, got {len(configs)}")
    c0, s0 = configs[0], states[0]
    for c, s, name in zip(configs[1:], states[1:], names[1:]):
        for key in _SHAPE_KEYS:
            a, b = getattr(c0, key, None), getattr(c, key, None)
            if a != b:
                raise UpcycleError(
                    f"{name}/config.json: {key} is {b!r} but {names[0]} has {a!r}; every model "
                    "mixed must have the same architecture (branch them from one seed)"
                )
        missing = sorted(set(s0) - set(s))
        extra = sorted(set(s) - set(s0))
        if missing or extra:
            which = f"lacks {missing[0]!r}" if missing else f"has an extra tensor {extra[0]!r}"
            raise UpcycleError(f"{name}: {which} (compared with {names[0]}); the models must have the same weights")
        for k, v in s.items():
            if v.shape != s0[k].shape:
                raise UpcycleError(f"{name}: {k} has shape {tuple(v.shape)} but {names[0]} has {tuple(s0[k].shape)}")
    if tokenizer_hashes is not None:
        for h, name in zip(tokenizer_hashes[1:], names[1:]):
            if h is not None and tokenizer_hashes[0] is not None and h != tokenizer_hashes[0]:
                raise UpcycleError(
                    f"{name}: its tokenizer differs from {names[0]}'s; the models must share one vocabulary"
                )


def tokenizer_hash(model_dir: str | Path) -> str | None:
    f = Path(model_dir) / "tokenizer.json"
    return hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None


def _router(plan: BamPlan, layer: int, stream: int, n: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed((plan.seed * 1_000_003 + layer) * 16 + stream)
    return (torch.randn(n, d, generator=g) * plan.router_std).to(dtype)


def _mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return (torch.stack([t.float() for t in tensors]).mean(0)).to(tensors[0].dtype)


def mixing_adapter(config: Any, plan: BamPlan):
    """The adapter of a family BAM and BTX mix: decoder LMs whose adapter says where attention lives."""
    adapter = adapter_for(config)
    if adapter.attn is None:
        kinds = [t for a in ADAPTERS if a.attn is not None for t in a.model_types]
        raise UpcycleError(
            f"{plan.method} mixes decoder LMs ({', '.join(kinds)}); {config.model_type} is a {adapter.family}: "
            "upcycle it with `upcycle sparse` instead"
        )
    return adapter


def mix_state_dicts(states: Sequence[dict[str, torch.Tensor]], config: Any, plan: BamPlan) -> dict[str, torch.Tensor]:
    """The mixed model's state dict from N dense state dicts (same keys and shapes)."""
    from upcycle.methods.surgery import _EXPERT_PARAMS

    if len(states) != plan.num_experts:
        raise UpcycleError(f"the plan mixes {plan.num_experts} models but {len(states)} state dicts were given")
    adapter = mixing_adapter(config, plan)
    L, D, _ = adapter.dims(config)
    out: dict[str, torch.Tensor] = {}
    taken: set[str] = set()

    def stack(key: str) -> torch.Tensor:
        taken.add(key)
        return torch.stack([s[key] for s in states])

    for i in range(L):
        prefix = adapter.mlp_prefix(i)
        for moe_name, proj_attr, kind in _EXPERT_PARAMS:
            proj = getattr(adapter, proj_attr)
            key = adapter.dense_key(i, proj, kind) if proj else None
            if key is None or key not in states[0]:
                if kind == "weight" and proj is not None:
                    raise UpcycleError(f"dense state dict has no {key!r}: is this checkpoint a {adapter.family}?")
                continue
            out[f"{prefix}.experts.{moe_name}"] = stack(key)
        ref = out[f"{prefix}.experts.up_proj"]
        out[f"{prefix}.router.weight"] = _router(plan, i, 0, plan.num_experts, D, ref.dtype)
        if not plan.attention_experts:
            continue
        a = adapter.attn_prefix(i)
        for proj in adapter.attn_proj:
            for kind, name in (("weight", proj), ("bias", proj[0] + "_bias")):
                key = f"{a}.{proj}.{kind}"
                if key not in states[0]:
                    continue
                if plan.kv == "shared" and proj in ("k_proj", "v_proj"):
                    taken.add(key)
                    out[f"{a}.{name}"] = _mean([s[key] for s in states])
                else:
                    out[f"{a}.{name}"] = stack(key)
        for norm in adapter.attn_norms:
            keys = sorted(k for k in states[0] if k.startswith(f"{a}.{norm}."))
            for key in keys:
                leaf = key[len(f"{a}.{norm}.") :]
                taken.add(key)
                if plan.kv == "shared" and norm == "k_norm":
                    out[f"{a}.{norm}s.0.{leaf}"] = _mean([s[key] for s in states])
                else:
                    for j, s in enumerate(states):
                        out[f"{a}.{norm}s.{j}.{leaf}"] = s[key]
        out[f"{a}.router.weight"] = _router(plan, i, 1, plan.num_experts, D, ref.dtype)
    for key in states[0]:
        if key not in taken:
            out[key] = _mean([s[key] for s in states])
    return out


def convert_structure(
    model: nn.Module, plan: BamPlan, layers: Sequence[int] | None = None, structure: dict | None = None
) -> list[int]:
    """Replace each layer's MLP by an empty MoE block of N experts and, for BAM, its attention by an
    empty mixture of N attention experts, in place."""
    from upcycle.methods.surgery import make_moe_block
    from upcycle.moe.attention import MoAttention
    from upcycle.moe.block import MoEBlock

    config = model.config
    adapter = mixing_adapter(config, plan)
    blocks = adapter.layer_list(model)
    layers = list(range(len(blocks))) if layers is None else list(layers)
    ffn = plan.ffn_plan()
    for i in layers:
        old = getattr(blocks[i], adapter.mlp)
        ref = getattr(old, adapter.up).weight if not isinstance(old, MoEBlock) else old.experts.up_proj
        adapter.set_mlp(blocks[i], make_moe_block(config, ffn, adapter, ref.dtype, ref.device, structure))
        if plan.attention_experts:
            attn = getattr(blocks[i], adapter.attn)
            if not isinstance(attn, MoAttention):  # in the block's train/eval mode, as set_mlp puts the MLP
                mixed = MoAttention(attn, plan.num_experts, plan.kv).train(blocks[i].training)
                setattr(blocks[i], adapter.attn, mixed)
    return layers


def is_parallel_block(config: Any) -> bool:
    return getattr(config, "model_type", None) in PARALLEL_BLOCK_TYPES


@torch.no_grad()
def mix(models: Sequence[nn.Module], plan: BamPlan, names: Sequence[str] | None = None, log=None) -> nn.Module:
    """One MoE model from N dense transformers models (the first one's config is the base)."""

    from upcycle.io.models import empty_model

    names = list(names or [f"model {j}" for j in range(len(models))])
    states = [m.state_dict() for m in models]
    check_compatible([m.config for m in models], states, names)
    config = models[0].config
    if log is not None:
        block = (
            "parallel block y = x + Attn(LN x) + FFN(LN x) (the BAM block)"
            if is_parallel_block(config)
            else "sequential block (x + Attn(LN1 x), then + FFN(LN2 .)), kept as the seed has it; BAM's parallel "
            "block needs a parallel-attention seed such as Cohere"
        )
        log(f"{plan.method}: {config.model_type}, {block}")
    mixed = mix_state_dicts(states, config, plan)
    dtype = next(iter(mixed.values())).dtype
    model = empty_model(copy_config(config), dtype)
    layers = convert_structure(model, plan)
    missing, unexpected = model.load_state_dict(mixed, strict=False)
    tied = set(_tied_keys(model))
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UpcycleError(f"mixed weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.config.upcycle = ConversionRecord(plan, layers).config_entry()
    return model.eval()


def copy_config(config):
    import copy

    c = copy.deepcopy(config)
    if hasattr(c, "upcycle"):
        del c.upcycle
    return c


def _tied_keys(model: nn.Module) -> list[str]:
    from upcycle.io.models import unique_state_dict

    return list(unique_state_dict(model)[1])
