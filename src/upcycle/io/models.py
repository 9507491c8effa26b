"""Models without weights: on the meta device (names, shapes, tied weights, no memory) or empty
(allocated, not initialised); and a model's state dict without tied duplicates.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def meta_model(config: Any, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The transformers model of `config` on the meta device: names, order, shapes, tied weights,
    no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)


def unique_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without tied duplicates, and {dropped key: key it is tied to}."""
    seen: dict[tuple, str] = {}
    out, tied = {}, {}
    for k, v in model.state_dict().items():
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if ident in seen:
            tied[k] = seen[ident]
            continue
        seen[ident] = k
        out[k] = v
    return out, tied


def model_class(config):
    """The transformers class a directory's config names (`architectures`), for encoders, ViT and T5;
    AutoModelForCausalLM where it names none or one transformers lacks."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModelForCausalLM


def empty_model(config: Any, dtype: torch.dtype | None = None, cls: Any = None) -> nn.Module:
    """The transformers model of `config` (of class `cls`, an Auto class or a model class; by default
    AutoModelForCausalLM), allocated but without spending time on random initialisation."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older layout
        from transformers.modeling_utils import no_init_weights
    cls = cls or AutoModelForCausalLM
    with no_init_weights():
        make = getattr(cls, "from_config", None) or cls._from_config  # Auto classes, or a model class
        return make(config, dtype=dtype)
