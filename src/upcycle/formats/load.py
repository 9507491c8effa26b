"""The one front door for loading a model directory: native upcycled, stock MoE (Mixtral, Qwen2/3-MoE,
FlexOlmo) or dense, safetensors only.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from upcycle.adapters import adapter_for
from upcycle.errors import UpcycleError
from upcycle.formats.native import read_record
from upcycle.io.models import empty_model, model_class
from upcycle.io.safetensors import INDEX, weight_files
from upcycle.methods.registry import rebuild


def load(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an upcycled model saved by `save`, or import a stock Mixtral / Qwen2-MoE / Qwen3-MoE
    directory (weights read through safetensors only)."""
    from transformers import AutoConfig

    from upcycle.formats.stock_import import import_stock, is_stock_moe

    path = Path(path)
    if is_stock_moe(path):  # a stock MoE class's config (our stock exports keep upcycle.json as provenance)
        return import_stock(path, dtype).to(device)
    record = read_record(path)
    config = AutoConfig.from_pretrained(path)  # never trust_remote_code
    files = weight_files(path)
    if not files:
        raise UpcycleError(f"{path}: no safetensors weights ({INDEX} or model.safetensors) found")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                state[k] = fh.get_tensor(k)
    stored_dtype = next(iter(state.values())).dtype
    model = empty_model(config, stored_dtype, model_class(config))
    rebuild(record, model)  # the plan's own method: sparse upcycling, or BAM / BTX mixing
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in record.tied_weights]
    if missing or unexpected:
        raise UpcycleError(
            f"{path}: weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()


def load_any(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Any model directory the CLI takes: native upcycled and stock MoE (Mixtral, Qwen2/3-MoE, FlexOlmo)
    directories through `load`, dense ones through transformers; safetensors only, fp32 by default."""
    from upcycle.formats.stock_import import is_stock_moe

    path = Path(path)
    if not path.is_dir():
        raise UpcycleError(f"model directory not found: {path}")
    if (path / "upcycle.json").is_file() or is_stock_moe(path):  # stock MoE classes are imported
        return load(path, dtype=dtype or torch.float32, device=device)
    if not (path / "config.json").is_file():
        raise UpcycleError(f"{path} has no config.json: not a Hugging Face model directory")
    if not weight_files(path):
        raise UpcycleError(
            f"{path}: no safetensors weights (model.safetensors or model.safetensors.index.json); "
            "convert the checkpoint to safetensors first"
        )
    try:
        model = model_class(_config(path)).from_pretrained(path, dtype=dtype or torch.float32, use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise UpcycleError(f"{path}: cannot load the model ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()


def _config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def load_dense(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A dense model for mixing (safetensors only), through `load_any`; upcycled (native) directories
    are refused."""
    model_dir = Path(model_dir)
    if (model_dir / "upcycle.json").is_file():
        raise UpcycleError(f"{model_dir} is an upcycled (MoE) model; mix dense models (the seed and its branches)")
    model = load_any(model_dir, dtype=dtype)
    adapter_for(model.config, source=str(model_dir / "config.json"))
    return model
