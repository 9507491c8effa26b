"""Router initialisation: seeded random rows (normal, zeros, uniform), and data-derived rows
(`router_init: data`) from the dense model's hidden states on prompts, one prompt group per expert.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from upcycle.errors import PlanError, UpcycleError

if TYPE_CHECKING:  # a plan at run time is an UpcyclePlan (BamPlan hands over its ffn_plan())
    from upcycle.adapters import MLPAdapter
    from upcycle.methods.plan import UpcyclePlan


def _generator(seed: int, layer: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + layer) * 16 + stream)


def init_router(plan: UpcyclePlan, layer: int, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Router weight (E, D): normal(0, std) by default (flaxformer / the paper), zeros, or a centred
    uniform with the same std. Granular plans draw E/G rows and repeat each G times (a virtual group
    shares one row). router_init=data needs the rows from `data_router_rows`: see `router_weight`."""
    rows = plan.num_experts // _groups(plan)
    std = plan.router_std
    if plan.router_init == "zeros":
        w = torch.zeros(rows, hidden_size)
    elif plan.router_init in ("normal", "data"):
        w = torch.randn(rows, hidden_size, generator=_generator(plan.seed, layer, 0)) * std
    else:  # uniform with standard deviation std
        a = std * math.sqrt(3.0)
        w = (torch.rand(rows, hidden_size, generator=_generator(plan.seed, layer, 0)) * 2 - 1) * a
    return _expand_groups(w, plan).to(dtype)


def router_weight(
    plan, layer: int, hidden_size: int, dtype: torch.dtype, data_rows: dict[int, torch.Tensor] | None = None
) -> torch.Tensor:
    if plan.router_init == "data":
        if data_rows is None or layer not in data_rows:
            raise UpcycleError(
                f"router_init=data: no router rows for layer {layer}; they come from running the "
                "dense model on router_prompts (surgery.upcycle with a tokenizer)"
            )
        return _expand_groups(data_rows[layer].float(), plan).to(dtype)
    return init_router(plan, layer, hidden_size, dtype)


def _groups(plan: UpcyclePlan) -> int:
    return plan.granularity if plan.expert_init == "granular" else 1


def _expand_groups(w: torch.Tensor, plan: UpcyclePlan) -> torch.Tensor:
    G = _groups(plan)
    return w.repeat_interleave(G, dim=0) if G > 1 else w


def read_prompts(path: str | Path, expected: int) -> list[list[str]]:
    """Prompt sets from a YAML file (a list with one entry per router row: a string or a list of strings;
    or {experts: [...]}) or a text file (sets separated by lines holding only `---`)."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"router_prompts: file not found: {path}")
    if path.suffix in (".yaml", ".yml", ".json"):
        data = _yaml(path)
        if isinstance(data, dict) and "experts" in data:
            data = data["experts"]
        if not isinstance(data, list):
            raise PlanError(
                f"{path}: expected a list with one prompt set per expert (a string or a list of strings each)"
            )
        sets = [[x] if isinstance(x, str) else x for x in data]
        if any(not isinstance(s, list) or not s or not all(isinstance(p, str) and p.strip() for p in s) for s in sets):
            raise PlanError(f"{path}: every prompt set must be a non-empty string or list of non-empty strings")
    else:
        blocks = [b.strip() for b in _split_text(path.read_text())]
        sets = [[b] for b in blocks if b]
    if len(sets) != expected:
        raise PlanError(
            f"{path}: {len(sets)} prompt sets, but the router has {expected} rows to initialise "
            "(one per expert; one per group of `granularity` experts for granular plans)"
        )
    return sets


def _yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PlanError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def _split_text(text: str) -> list[str]:
    out, cur = [], []
    for line in text.splitlines():
        if line.strip() == "---":
            out.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    out.append("\n".join(cur))
    return out


@torch.no_grad()
def data_router_rows(
    model, tokenizer, plan: UpcyclePlan, layers: list[int], adapter: MLPAdapter
) -> dict[int, torch.Tensor]:
    """{layer: (E/G, D) router rows} from the hidden states entering each chosen layer's MLP on the plan's
    router_prompts (one forward pass of the dense model per prompt). See the module docstring."""
    sets = read_prompts(plan.router_prompts, plan.num_experts // _groups(plan))
    blocks = adapter.layer_list(model)
    D = adapter.dims(model.config)[1]
    sums = {i: torch.zeros(len(sets), D, dtype=torch.float64) for i in layers}
    counts = torch.zeros(len(sets), dtype=torch.float64)
    current = [0]

    def hook(i):
        def f(module, args):
            x = args[0].detach().reshape(-1, D).double()
            sums[i][current[0]] += x.sum(0).cpu()

        return f

    handles = [getattr(blocks[i], adapter.mlp).register_forward_pre_hook(hook(i)) for i in layers]
    device = next(model.parameters()).device
    try:
        for e, prompts in enumerate(sets):
            current[0] = e
            for p in prompts:
                ids = tokenizer(p, return_tensors="pt").input_ids.to(device)
                if ids.shape[1] == 0:
                    raise PlanError(f"{plan.router_prompts}: prompt {p!r} has no tokens")
                model(input_ids=ids)
                counts[e] += ids.shape[1]
    finally:
        for h in handles:
            h.remove()
    out = {}
    for i in layers:
        means = sums[i] / counts[:, None]
        centred = means - means.mean(0, keepdim=True) if len(sets) > 1 else means
        norms = centred.norm(dim=1, keepdim=True).clamp_min(1e-12)
        out[i] = (centred / norms * plan.router_std * math.sqrt(D)).float()
    return out
