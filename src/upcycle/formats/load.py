"""The one front door for loading a model directory: native upcycled, stock MoE (Mixtral, Qwen2/3-MoE,
FlexOlmo) or dense, safetensors only.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from upcycle.adapters import adapter_for
from upcycle.errors import UpcycleError
from upcycle.formats.validate import check_native, load_pretrained, read_config
from upcycle.io.models import empty_model, model_class
from upcycle.methods.registry import rebuild


def load(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an upcycled model saved by `save`, or import a stock Mixtral / Qwen2-MoE / Qwen3-MoE
    directory (weights read through safetensors only). Everything is checked before a tensor is read:
    upcycle.json, config.json, every safetensors header, and each tensor's name and shape against the
    model the config and the plan describe (expert counts included)."""
    from upcycle.formats.stock_import import import_stock, is_stock_moe

    path = Path(path)
    if is_stock_moe(path):  # a stock MoE class's config (our stock exports keep upcycle.json as provenance)
        read_config(path)
        return import_stock(path, dtype).to(device)
    record, config, source = check_native(path)  # never trust_remote_code
    with source:
        model = empty_model(config, source.first_float_dtype(), model_class(config))
        rebuild(record, model)  # the plan's own method: sparse upcycling, or BAM / BTX mixing
        state = {k: source.read_copy(k) for k in source.tensors}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in record.tied_weights]
    if missing or unexpected:  # check_tensors has seen to it; kept as the last line of defence
        raise UpcycleError(
            f"{path}: weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()


def load_any(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Any model directory the CLI takes: native upcycled and stock MoE (Mixtral, Qwen2/3-MoE, FlexOlmo)
    directories through `load`, dense ones through transformers; safetensors only, fp32 by default, and
    checked before loading (formats.validate)."""
    from upcycle.formats.stock_import import is_stock_moe

    path = Path(path)
    if not path.is_dir():
        raise UpcycleError(f"model directory not found: {path}")
    if (path / "upcycle.json").is_file() or is_stock_moe(path):  # stock MoE classes are imported
        return load(path, dtype=dtype or torch.float32, device=device)
    return load_pretrained(path, dtype=dtype or torch.float32).to(device).eval()


def load_dense(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A dense model (for mixing, tiling, upcycling), safetensors only, checked first; upcycled (native)
    and stock MoE directories are refused."""
    from upcycle.formats.stock_import import is_stock_moe

    model_dir = Path(model_dir)
    if (model_dir / "upcycle.json").is_file() or is_stock_moe(model_dir):
        raise UpcycleError(
            f"{model_dir} is an upcycled (MoE) model, not a dense one; give the dense checkpoint it came from"
        )
    model = load_pretrained(model_dir, dtype=dtype)
    adapter_for(model.config, source=str(model_dir / "config.json"))
    return model
