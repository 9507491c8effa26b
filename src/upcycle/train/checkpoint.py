"""Checkpoints: out/checkpoints/step-N/ (atomic): model.safetensors, optimizer.pt (parameter-name
keyed, read with weights_only=True), rng.pt, state.json (step, data position, history); the last
`keep_checkpoints` are kept and a resumed run continues bit-exactly.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from upcycle.data.tokens import Batches
from upcycle.errors import UpcycleError
from upcycle.train.config import TrainConfig
from upcycle.train.dist import _barrier, _Dist
from upcycle.train.optim import named_optimizer_state


def _model_state(model: nn.Module, raw: nn.Module, d: _Dist) -> dict[str, torch.Tensor]:
    """Full model state (all ranks take part under FSDP), tied duplicates dropped."""
    if d.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = raw.state_dict()
    keep = {n for n, _ in raw.named_parameters()} | {n for n, _ in raw.named_buffers()}
    return {k: v.detach().cpu().contiguous() for k, v in sd.items() if k in keep}


def _optimizer_state(model: nn.Module, opt, d: _Dist) -> dict:
    if d.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return named_optimizer_state(opt)


def _load_full_state_fsdp(model: nn.Module, opt, named: dict) -> None:
    """A name-keyed full (unsharded) AdamW state, e.g. `carry_over_optimizer_state`, into an optimizer
    over FSDP2-sharded parameters: every rank holds the full state and keeps its own shard. The groups
    (hyperparameters from this run's config) are the optimizer's own; parameters the state lacks start
    fresh."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    current = get_optimizer_state_dict(model, opt, options=options)
    known = {n for g in current["param_groups"] for n in g["params"]}
    unknown = sorted(set(named["state"]) - known)
    if unknown:
        raise UpcycleError(f"optimizer state has parameters this model lacks: {unknown[:3]}")
    state = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for n, s in named["state"].items()}
    set_optimizer_state_dict(model, opt, {"state": state, "param_groups": current["param_groups"]}, options=options)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate((s["python_version"], tuple(s["python"]), s["python_gauss"]))
    np.random.set_state(
        ("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], s["numpy_gauss"][0], s["numpy_gauss"][1])
    )
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def refuse_mixed_runs(out_dir: Path, resume, overwrite: bool) -> None:
    """A run's output-directory rule, checkable before any work: resuming needs the run's checkpoints,
    and a fresh run starts in an empty (or new) directory unless overwrite. Never mixes two runs."""
    out_dir = Path(out_dir)
    if resume is True and not (out_dir / "checkpoints").is_dir():
        raise UpcycleError(f"nothing to resume: {out_dir}/checkpoints does not exist")
    if not resume and out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UpcycleError(
            f"output directory already exists and is not empty: {out_dir} (pass --resume to continue "
            "its run, --overwrite to start over, or choose another --out)"
        )


def checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))  # stray copies (step-000030.bak) are not checkpoints


def _save_checkpoint(
    out_dir: Path, step: int, model, raw, opt, batches: Batches, state: dict, config: TrainConfig, d: _Dist
) -> None:
    from safetensors.torch import save_file

    from upcycle.io.dirs import atomic_dir

    model_sd = _model_state(model, raw, d)
    opt_sd = _optimizer_state(model, opt, d)
    if d.main:
        target = out_dir / "checkpoints" / f"step-{step:06d}"
        with atomic_dir(target, overwrite=True) as tmp:
            save_file(model_sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            torch.save(opt_sd, tmp / "optimizer.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            (tmp / "state.json").write_text(
                json.dumps(
                    dict(state, step=step, data=batches.state_dict(), config=config.to_dict(), world_size=d.world),
                    indent=1,
                )
                + "\n"
            )
        for old in checkpoints(out_dir)[: -config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(d)


def load_model_weights(raw: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    missing, unexpected = raw.load_state_dict(sd, strict=False)
    tied = set(raw.state_dict()) - {n for n, _ in raw.named_parameters()} - {n for n, _ in raw.named_buffers()}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UpcycleError(
            f"{path}: checkpoint does not match the model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}; resume with the model the run started from"
        )
