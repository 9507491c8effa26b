"""The trained model written at the end: native format for upcycled models (rebuilt through their
conversion record), a transformers directory for dense ones.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from upcycle.errors import UpcycleError
from upcycle.moe.block import moe_blocks
from upcycle.train.checkpoint import _model_state
from upcycle.train.dist import _Dist


def _save_final(model, raw: nn.Module, target: Path, d: _Dist, tokenizer, source_dir) -> None:
    """Native format for upcycled models, a transformers directory for dense ones (atomic)."""
    from upcycle.formats.native import save as native_save
    from upcycle.io.compat import make_portable
    from upcycle.io.dirs import atomic_dir, copy_side_files
    from upcycle.methods.registry import plan_from_dict

    sd = _model_state(model, raw, d) if d.mode == "fsdp" else None
    if not d.main:
        return
    if sd is not None:  # FSDP: rebuild an unsharded replica on rank 0 from the gathered state
        raw = _replica(raw)
        _load_sd(raw, sd)
    raw.eval()
    info = getattr(raw.config, "upcycle", None)
    if moe_blocks(raw):
        if not info:
            raise UpcycleError("an MoE model without a plan in its config cannot be saved in the native format")
        plan = plan_from_dict(info)  # UpcyclePlan, or BamPlan for BAM / BTX
        native_save(raw, plan, target, source_dir=source_dir, overwrite=True)
        if tokenizer is not None and source_dir is None:
            tokenizer.save_pretrained(target)
            make_portable(target)
        return
    with atomic_dir(target, overwrite=True) as tmp:
        raw.save_pretrained(tmp)
        if source_dir is not None:
            copy_side_files(Path(source_dir), tmp, replace=False)
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        make_portable(tmp)


def _replica(raw: nn.Module) -> nn.Module:

    from upcycle.io.models import empty_model
    from upcycle.methods.registry import rebuild, record_from_config

    dtype = next(iter(raw.state_dict().values())).dtype
    rep = empty_model(raw.config, dtype)
    info = getattr(raw.config, "upcycle", None)
    if moe_blocks(raw):
        rebuild(record_from_config(info), rep)  # through the plan's own method (sparse, BAM, BTX)
    return rep


def _load_sd(raw: nn.Module, sd: dict) -> None:
    missing, unexpected = raw.load_state_dict(sd, strict=False)
    if unexpected:
        raise UpcycleError(f"state does not match the model: unexpected {unexpected[:3]}")
    raw.tie_weights()
