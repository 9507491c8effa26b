"""Checkpoints: out/checkpoints/step-N/ (atomic): model.safetensors, optimizer.pt (parameter-name
keyed, read with weights_only=True), rng.pt, state.json (step, data position, history); the last
`keep_checkpoints` are kept and a resumed run continues bit-exactly.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
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
    if not resume and not overwrite and killed_before_first_checkpoint(out_dir):
        print(
            f"upcycle: note: {out_dir} holds a run stopped before its first checkpoint; starting it again",
            file=sys.stderr,
        )
        return
    if not resume and out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UpcycleError(
            f"output directory already exists and is not empty: {out_dir} (pass --resume to continue "
            "its run, --overwrite to start over, or choose another --out)"
        )


# What a training run writes before its first checkpoint
_EARLY_RUN_FILES = {"train_config.yaml", "metrics.csv", "tb", "checkpoints"}


def killed_before_first_checkpoint(out_dir: Path) -> bool:
    """A run directory that holds only what a run writes before its first checkpoint (no checkpoint, no
    final model): a run stopped early, which may start again from scratch."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or not (out_dir / "train_config.yaml").is_file():
        return False
    names = {p.name for p in out_dir.iterdir()}
    ckpt_dir = out_dir / "checkpoints"
    early = not ckpt_dir.is_dir() or not any(p.name.startswith("step-") for p in ckpt_dir.iterdir())
    return early and names <= _EARLY_RUN_FILES


def load_pt(path: Path):
    """A checkpoint's torch file (optimizer state, RNG state), tensors only (weights_only)."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - zip, pickle and unpickler errors of several kinds
        raise UpcycleError(
            f"{path}: not readable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); resume from "
            "another checkpoint (--resume checkpoints/step-N) or start the run again with --overwrite"
        ) from None


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

    try:
        sd = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors' own error type
        raise UpcycleError(f"{path}: not a readable safetensors file ({e}); resume from another checkpoint") from None
    missing, unexpected = raw.load_state_dict(sd, strict=False)
    tied = set(raw.state_dict()) - {n for n, _ in raw.named_parameters()} - {n for n, _ in raw.named_buffers()}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UpcycleError(
            f"{path}: checkpoint does not match the model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}; resume with the model the run started from"
        )


def damage(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint directory (naming the file), or None when it is intact: state.json
    readable, model.safetensors' header and byte ranges whole, optimizer.pt and rng.pt whole archives."""
    import zipfile

    from upcycle.io.safetensors import read_header

    f = ckpt / "state.json"
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return f"{f}: no step recorded"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{f}: not readable ({type(e).__name__}: {e})"
    try:
        read_header(ckpt / "model.safetensors")
    except UpcycleError as e:
        return str(e).split(";")[0]
    for name in ("optimizer.pt", "rng.pt"):
        try:
            with zipfile.ZipFile(ckpt / name) as z:
                z.namelist()
        except (OSError, zipfile.BadZipFile) as e:
            return f"{ckpt / name}: damaged or truncated ({e})"
    return None


def resume_point(out_dir: Path, resume, log=print) -> Path:
    """The checkpoint a resumed run continues from: the given one (refused if damaged), or the newest
    intact one, saying which damaged ones were passed over."""
    if resume is not True:
        ckpt = Path(resume)
        if not (ckpt / "state.json").is_file():
            raise UpcycleError(f"{ckpt} is not a checkpoint (no state.json); give a checkpoints/step-N directory")
        bad = damage(ckpt)
        if bad:
            raise UpcycleError(f"cannot resume from {ckpt}: {bad}; give another checkpoint")
        return ckpt
    found = checkpoints(out_dir)
    if not found:
        raise UpcycleError(f"nothing to resume: {out_dir}/checkpoints has no complete checkpoint")
    skipped = []
    for ckpt in reversed(found):
        bad = damage(ckpt)
        if bad is None:
            if skipped:
                log(f"upcycle: note: resuming from {ckpt.name}, the newest intact checkpoint")
            return ckpt
        log(f"upcycle: warning: {bad}: passing over {ckpt.name}")
        skipped.append(bad)
    raise UpcycleError(
        f"no intact checkpoint in {out_dir}/checkpoints ({skipped[0]}); start the run again with --overwrite"
    )


# Settings a resumed run may change without changing what it computes
RESUMABLE_CHANGES = {"eval_every", "checkpoint_every", "keep_checkpoints", "log_every", "parallel"}
RESUMABLE_CHANGES |= {"pretrain_tokens", "pretrain_flops"}


def config_changes(recorded: dict, config: TrainConfig) -> list[str]:
    """The settings of `config` that differ from those a checkpoint recorded (`name old -> new`)."""
    now = json.loads(json.dumps(config.to_dict()))
    return [
        f"{k} {recorded.get(k)!r} -> {v!r}"
        for k, v in now.items()
        if k not in RESUMABLE_CHANGES and k in recorded and recorded[k] != v
    ]


def read_state(ckpt: Path, config: TrainConfig, accept_changes: bool) -> tuple[dict, list[str]]:
    """A checkpoint's state.json and the settings this run changes (accepted, or refused here)."""
    state = json.loads((ckpt / "state.json").read_text())
    changes = config_changes(state.get("config") or {}, config)
    if changes and not accept_changes:
        raise UpcycleError(
            f"{ckpt} was trained with other settings than this resume gives: {', '.join(changes)}; resume "
            "with the run's own settings (drop those flags), or pass --accept-changes to continue with the new ones"
        )
    return state, changes
