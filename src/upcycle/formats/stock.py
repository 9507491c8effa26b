"""Export to stock transformers MoE classes, and import them back.

A stock class is a target only where it computes exactly what our model computes; `why_not` says
precisely why not otherwise. Our model is the source's own transformers class (Llama, Mistral,
Qwen2, Qwen3) with MoE blocks in place of some MLPs, so a target must match three things:

    attention   Mixtral = Llama/Mistral attention (no biases); Qwen2-MoE = Qwen2 attention (q/k/v
                bias, none on o), which is Llama's when the biases are zero; Qwen3-MoE = Qwen3's
                (per-head q/k RMSNorm), so only Qwen3 sources; OLMoE has a pre-norm block with
                full-width q/k RMSNorm, which no dense transformers class has.
    placement   Mixtral: every layer MoE. Qwen2/3-MoE: any set, written as `mlp_only_layers` with
                `decoder_sparse_step = 1`.
    combine     softmax over all experts, top-k, renormalised (Mixtral always; Qwen `norm_topk_prob`),
                no capacity, no expert choice, no soft routing.

Expert tensors are written per expert by default ("legacy" keys, which every engine and every
transformers version reads: Mixtral `block_sparse_moe.experts.{j}.w1/w2/w3`, Qwen
`mlp.experts.{j}.gate_proj/up_proj/down_proj`), or in transformers 5's fused layout on request
(`mlp.experts.gate_up_proj` (E, 2F, D) with gate rows first, `mlp.experts.down_proj` (E, D, F)).

Qwen2-MoE always has a sigmoid-gated shared expert. A model without one is written with a null shared
expert of width `shared_expert_size` (default NULL_SHARED_EXPERT_WIDTH): gate and up projections zero,
down projection zero, so its output is exactly 0 in every engine; its gate weight is a nonzero constant,
because llama.cpp computes sigmoid(g) as silu(g)/g, which is 0/0 where g = 0. Never zero-width tensors:
vLLM builds no shared expert for width 0 and then refuses the (0, D) tensors.

All mappings work tensor by tensor (`stock_items`, `native_items`), so the streaming converter can
write a stock layout without the model in memory."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from upcycle.errors import UpcycleError
from upcycle.formats.targets import _COMMON, LAYOUTS, NULL_SHARED_EXPERT_WIDTH, TARGETS, _cfg, check_exportable
from upcycle.io.writer import Item, tensor_items
from upcycle.methods.plan import UpcyclePlan
from upcycle.methods.registry import plan_from_meta


def stock_config(
    target: str,
    config: Any,
    plan: UpcyclePlan,
    moe_layers: list[int],
    *,
    structure: dict | None = None,
    shared_expert_size: int | None = None,
):
    """The stock config.json content of the exported model (a transformers config object)."""
    from transformers import AutoConfig

    t, c = TARGETS[target], _cfg(config)
    kw = {k: c[k] for k in _COMMON if k in c and c[k] is not None}
    kw.update(
        num_experts_per_tok=plan.top_k,
        router_aux_loss_coef=plan.aux_loss_coef,
        output_router_logits=False,
        architectures=[t.architecture],
    )
    if "dtype" in c:
        kw["dtype"] = c["dtype"]
    structure = structure or {}
    F = structure.get("expert_intermediate_size") or c["intermediate_size"]
    shared = structure.get("shared_expert")
    if target == "mixtral":
        kw.update(
            num_local_experts=plan.num_experts,
            intermediate_size=F,
            router_jitter_noise=0.0,
            sliding_window=c.get("sliding_window"),
        )
    elif target == "flex_olmo":
        kw.update(
            num_experts=plan.num_experts,
            intermediate_size=F,
            norm_topk_prob=bool(plan.normalize_weights),
            attention_bias=bool(c.get("attention_bias", False)),
        )
    else:
        dense = [i for i in range(c["num_hidden_layers"]) if i not in moe_layers]
        kw.update(
            num_experts=plan.num_experts,
            moe_intermediate_size=F,
            intermediate_size=c["intermediate_size"],
            decoder_sparse_step=1,
            mlp_only_layers=dense,
            norm_topk_prob=bool(plan.normalize_weights),
            use_sliding_window=False,
        )
        if target == "qwen2_moe":
            S = shared["intermediate_size"] if shared else null_shared_width(shared_expert_size)
            kw.update(shared_expert_intermediate_size=S, qkv_bias=True)
        if target == "qwen3_moe":
            kw.update(attention_bias=bool(c.get("attention_bias", False)))
    return AutoConfig.for_model(target, **kw)


def null_shared_width(size: int | None) -> int:
    """The width of the null shared expert: `size`, or the default; refuses 0 and below."""
    if size is None:
        return NULL_SHARED_EXPERT_WIDTH
    if size < 1:
        raise UpcycleError(
            f"shared expert size {size}: Qwen2-MoE's shared expert needs a width of at least 1 (a zero-width "
            "one loads in transformers but vLLM refuses its tensors); leave --shared-expert-size out for "
            f"the default {NULL_SHARED_EXPERT_WIDTH}"
        )
    return size


def _layer(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def stock_items(
    items: Iterable[Item],
    target: str,
    config: Any,
    moe_layers: list[int],
    *,
    layout: str = "legacy",
    structure: dict | None = None,
    shared_expert_size: int | None = None,
) -> Iterator[Item]:
    """Map our tensors to the target's names and shapes, lazily: each output item produces its values
    from the input items' producers when the writer asks for them (in whatever order it writes)."""
    if layout not in LAYOUTS:
        raise UpcycleError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    t, c = TARGETS[target], _cfg(config)
    moe = set(moe_layers)
    D, hd = c["hidden_size"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    shared = (structure or {}).get("shared_expert")
    stacks = _Recent(3)  # a layer's gate, up and down stacks, produced once for its E per-expert items
    gates: dict[int, Item] = {}
    for it in items:
        name, i = it.name, _layer(it.name)
        if i is None or i not in moe or f".{i}.mlp." not in name:
            yield it
            if t.zero_qkv_bias and c.get("model_type") != "qwen2" and name.endswith("self_attn.q_proj.weight"):
                base, kv = name.removesuffix("q_proj.weight"), c["num_key_value_heads"] * hd
                for proj, n in (("q", it.shape[0]), ("k", kv), ("v", kv)):
                    yield _zeros(f"{base}{proj}_proj.bias", (n,), it.dtype)
            continue
        base, leaf = f"model.layers.{i}", name.split(f"model.layers.{i}.mlp.", 1)[1]
        if leaf == "router.weight":
            yield _renamed(it, f"{base}.{t.experts_prefix if layout == 'legacy' else 'mlp'}.gate.weight")
            if t.shared_expert and not shared:  # the null shared expert: output exactly 0, gate finite
                p = f"{base}.mlp.shared_expert."
                S = null_shared_width(shared_expert_size)
                yield from (
                    _zeros(p + "gate_proj.weight", (S, D), it.dtype),
                    _zeros(p + "up_proj.weight", (S, D), it.dtype),
                    _zeros(p + "down_proj.weight", (D, S), it.dtype),
                    _full(f"{base}.mlp.shared_expert_gate.weight", (1, D), it.dtype, 1.0 / D),
                )
            elif t.shared_expert and not shared.get("gated", True):
                yield _zeros(f"{base}.mlp.shared_expert_gate.weight", (1, D), it.dtype)  # sigmoid(0) = 1/2
        elif leaf.startswith("shared_expert."):
            if leaf == "shared_expert.gate.weight":
                yield _renamed(it, f"{base}.mlp.shared_expert_gate.weight")
            elif leaf == "shared_expert.down_proj.weight" and not shared.get("gated", True):
                yield Item(f"{base}.mlp.{leaf}", it.shape, it.dtype, lambda it=it: it.produce() * 2)  # 1/2 * 2 = 1
            else:
                yield _renamed(it, f"{base}.mlp.{leaf}")
        elif leaf.endswith("_bias") or not leaf.startswith("experts."):
            raise UpcycleError(f"{name}: no place for this tensor in {t.architecture}")
        else:
            which = leaf.removeprefix("experts.")
            if layout == "legacy":
                proj = t.expert_names[("gate_proj", "up_proj", "down_proj").index(which)]
                for e in range(it.shape[0]):
                    yield Item(
                        f"{base}.{t.experts_prefix}.experts.{e}.{proj}.weight",
                        it.shape[1:],
                        it.dtype,
                        lambda it=it, e=e: stacks.get(it)[e],
                    )
            elif which == "gate_proj":
                gates[i] = it
            elif which == "up_proj":
                g = gates.pop(i)
                yield Item(
                    f"{base}.mlp.experts.gate_up_proj",
                    (g.shape[0], g.shape[1] + it.shape[1], g.shape[2]),
                    it.dtype,
                    lambda g=g, u=it: torch.cat([g.produce(), u.produce()], dim=1),
                )
            else:
                yield _renamed(it, f"{base}.mlp.experts.down_proj")
    if gates:
        raise UpcycleError(f"layers {sorted(gates)}: gate projection without its up projection")


class _Recent:
    """The last few produced tensors, by item name: a stack is built once, not once per expert."""

    def __init__(self, size: int):
        self.size, self.cache = size, {}

    def get(self, it: Item) -> torch.Tensor:
        if it.name not in self.cache:
            if len(self.cache) >= self.size:
                self.cache.pop(next(iter(self.cache)))
            self.cache[it.name] = it.produce()
        return self.cache[it.name]


def _renamed(it: Item, name: str) -> Item:
    return Item(name, it.shape, it.dtype, it.produce)


def _zeros(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Item:
    return Item(name, tuple(shape), dtype, lambda: torch.zeros(shape, dtype=dtype))


def _full(name: str, shape: tuple[int, ...], dtype: torch.dtype, value: float) -> Item:
    return Item(name, tuple(shape), dtype, lambda: torch.full(shape, value, dtype=dtype))


def export(
    source: str | Path | nn.Module,
    target: str,
    out_dir: str | Path,
    *,
    layout: str = "legacy",
    plan: UpcyclePlan | None = None,
    shared_expert_size: int | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = False,
    source_dir: str | Path | None = None,
) -> Path:
    """Write an upcycled model (a native directory, read tensor by tensor, or a model in memory) as a
    stock transformers MoE checkpoint, atomically. Raises UpcycleError naming every reason it cannot."""
    import time
    from contextlib import nullcontext

    from upcycle.formats.native import FORMAT, FORMAT_VERSION, read_meta, versions
    from upcycle.io.models import unique_state_dict

    if isinstance(source, nn.Module):
        from upcycle.methods.surgery import applied_plan, structure_of

        plan = applied_plan(plan or plan_from_meta(source.config.upcycle), source.config, source)
        moe_layers = list(source.config.upcycle["moe_layers"])
        config = {k: v for k, v in source.config.to_dict().items() if k != "upcycle"}
        structure = structure_of(source)
        reader = nullcontext()
        items = tensor_items(unique_state_dict(source)[0])
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "plan": plan.to_dict(),
            "moe_layers": moe_layers,
            **structure,
            "source": {"path": str(source_dir) if source_dir else None, "weights": {}},
            "versions": versions(),
        }
    else:
        from upcycle.formats.validate import check_native

        source_dir = source_dir or source
        # every tensor against config.json and upcycle.json before a byte is written; its weights are the reader
        _, _, s = check_native(source)
        reader = s
        config, plan, moe_layers, structure = read_native(source)
        meta = read_meta(Path(source)) | {"versions": versions()}
        items = [Item(k, s.info(k).shape, s.info(k).dtype, lambda k=k: s.read(k)) for k in s.tensors]
    # Provenance, as every output of ours has: what the weights are (plan, layers, source) and what wrote them.
    meta["exported"] = {
        "to": target,
        "layout": layout,
        "from": str(source) if not isinstance(source, nn.Module) else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with reader:
        write_stock(
            items,
            target,
            out_dir,
            config,
            plan,
            moe_layers,
            structure=structure,
            layout=layout,
            shared_expert_size=shared_expert_size,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            progress=progress,
            side_files_from=source_dir,
            meta=meta,
        )
    return Path(out_dir)


def read_native(path: str | Path) -> tuple[dict, UpcyclePlan, list[int], dict]:
    """(config.json without its plan entry, plan, MoE layers, shape structure) of a native directory."""
    from upcycle.formats.native import read_meta

    path = Path(path)
    meta = read_meta(path)
    config = {k: v for k, v in json.loads((path / "config.json").read_text()).items() if k != "upcycle"}
    structure = {k: meta[k] for k in ("expert_intermediate_size", "shared_expert") if k in meta}
    return config, plan_from_meta(meta["plan"]), meta["moe_layers"], structure


def write_stock(
    items: list[Item],
    target: str,
    out_dir: str | Path,
    config: dict,
    plan: UpcyclePlan,
    moe_layers: list[int],
    *,
    structure: dict | None = None,
    layout: str = "legacy",
    shared_expert_size: int | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = False,
    side_files_from: str | Path | None = None,
    meta: dict | None = None,
) -> None:
    """Check, map and write items (ours, lazily produced) as the stock checkpoint, tensor by tensor; `meta`,
    when given, is written as upcycle.json (provenance)."""

    from tqdm.auto import tqdm

    from upcycle.io.compat import make_portable
    from upcycle.io.dirs import atomic_dir, check_disk_space, copy_side_files, parse_size
    from upcycle.io.writer import output_bytes, write_items

    check_exportable(target, config, plan, moe_layers, structure)
    cfg = stock_config(target, config, plan, moe_layers, structure=structure, shared_expert_size=shared_expert_size)
    mapped = list(
        stock_items(
            items, target, config, moe_layers, layout=layout, structure=structure, shared_expert_size=shared_expert_size
        )
    )
    limit = parse_size(max_shard_size)
    check_disk_space(Path(out_dir), output_bytes(mapped, limit))
    with atomic_dir(Path(out_dir), overwrite, [side_files_from]) as tmp:
        cfg.save_pretrained(tmp)
        with tqdm(
            total=sum(it.nbytes for it in mapped),
            unit="B",
            unit_scale=True,
            desc=f"writing {target}",
            disable=not progress,
        ) as bar:
            write_items(mapped, tmp, limit, bar)
        if meta is not None:
            (tmp / "upcycle.json").write_text(json.dumps(meta, indent=2) + "\n")
        if side_files_from is not None:
            copy_side_files(Path(side_files_from), tmp)
        make_portable(tmp)  # rope_theta beside rope_parameters, a tokenizer class 4.x knows
