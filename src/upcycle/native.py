"""The native on-disk format and `upcycle.load`.

    out/
      config.json                       the base model's config, plus an "upcycle" entry (the plan)
      upcycle.json                      plan, MoE layers, versions, sha256 of the source weights
      model-00001-of-0000N.safetensors  shards, split by bytes
      model.safetensors.index.json      {"metadata": {"total_size": ...}, "weight_map": {...}}
      tokenizer files, generation_config.json (copied from the source)

Everything is written into a temporary sibling directory that is renamed into place at the end:
an interrupted save leaves no output directory behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UpcycleError
from .plan import UpcyclePlan

FORMAT = "upcycle-native"
FORMAT_VERSION = 1
INDEX = "model.safetensors.index.json"
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "added_tokens.json",
)


def versions() -> dict[str, str]:
    import safetensors
    import transformers

    from . import __version__

    return {
        "upcycle": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    raise UpcycleError(f"max_shard_size: cannot read {size!r}; write it like 5GB or 500MB")


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else []


def sha256_files(files: list[Path]) -> dict[str, str]:
    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
        out[f.name] = "sha256:" + h.hexdigest()
    return out


@contextmanager
def atomic_dir(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `out_dir`; on success rename it to `out_dir`.

    The temporary directory is `.NAME.tmp-PID-XXXX`: an exception (KeyboardInterrupt included)
    removes it; one left by a killed process is removed by the next writer of the same `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UpcycleError(f"output directory already exists: {out_dir} (choose another --out or pass --overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, trash / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temp_dirs(out_dir: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` directories next to `out_dir` left by a writer that was killed
    (SIGKILL, power loss): those whose PID is no longer a running process. A live writer's
    directory is left alone. Returns what was removed."""
    removed = []
    for d in Path(out_dir).parent.glob(f".{Path(out_dir).name}.tmp-*"):
        pid = d.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _default_permissions(root: Path) -> None:
    """mkdtemp and safetensors create private files; give the output the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for f in root.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


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


def write_shards(tensors: dict[str, torch.Tensor], out: Path, max_shard_size: int, progress=None) -> dict:
    shards: list[list[str]] = [[]]
    size = 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    weight_map, total = {}, 0
    for j, keys in enumerate(shards, 1):
        name = f"model-{j:05d}-of-{len(shards):05d}.safetensors"
        part = {k: tensors[k].detach().contiguous().cpu() for k in keys}
        save_file(part, str(out / name), metadata={"format": "pt"})
        for k in keys:
            weight_map[k] = name
            total += part[k].numel() * part[k].element_size()
        if progress is not None:
            progress.update(sum(part[k].numel() * part[k].element_size() for k in keys))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def save(
    model: nn.Module,
    plan: UpcyclePlan,
    out_dir: str | Path,
    *,
    source_dir: str | Path | None = None,
    source_hashes: dict[str, str] | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write an upcycled model in the native format (atomically)."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    tensors, tied = unique_state_dict(model)
    nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
    parent = out_dir.parent if out_dir.parent.exists() else Path.cwd()
    free = shutil.disk_usage(parent).free
    if free < nbytes + (64 << 20):
        raise UpcycleError(
            f"not enough disk space for {out_dir}: need {nbytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free on {parent}"
        )
    from .surgery import applied_plan, structure_of

    plan = applied_plan(plan, model.config, model)
    layers = _moe_layer_indices(model)
    structure = structure_of(model)
    with atomic_dir(out_dir, overwrite) as tmp:
        model.config.architectures = [type(model).__name__]  # the class `load` rebuilds
        model.config.upcycle = plan.to_dict() | {"moe_layers": layers} | structure
        model.config.save_pretrained(tmp)
        bar = tqdm(total=nbytes, unit="B", unit_scale=True, desc="writing shards", disable=not progress)
        with bar:
            write_shards(tensors, tmp, parse_size(max_shard_size), bar)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "plan": plan.to_dict(),
            "moe_layers": layers,
            "tied_weights": tied,
            **structure,
            "source": {"path": str(source_dir) if source_dir else None, "weights": source_hashes or {}},
            "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / "upcycle.json").write_text(json.dumps(meta, indent=2) + "\n")
        if source_dir is not None:
            for name in SIDE_FILES:
                if (Path(source_dir) / name).is_file():
                    shutil.copy2(Path(source_dir) / name, tmp / name)
    return out_dir


def _moe_layer_indices(model: nn.Module) -> list[int] | dict[str, list[int]]:
    """MoE layer indices: a list, or {stack: list} for models with several stacks (T5)."""
    from .adapters import stacks_for
    from .moe import MoEBlock

    stacks = stacks_for(model.config, model=model)
    found = {
        a.stack: [i for i, b in enumerate(a.layer_list(model)) if isinstance(a.get_mlp(b), MoEBlock)] for a in stacks
    }
    return found[stacks[0].stack] if len(stacks) == 1 else found


def model_class(config):
    """The transformers class a directory's config names (`architectures`), for encoders, ViT and T5;
    AutoModelForCausalLM where it names none or one transformers lacks."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModelForCausalLM


def read_meta(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise UpcycleError(f"model directory not found: {path}")
    f = path / "upcycle.json"
    if not f.is_file():
        raise UpcycleError(
            f"{path} has no upcycle.json: not an upcycled model (for a dense model use transformers' from_pretrained)"
        )
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise UpcycleError(
            f"{f}: format {meta.get('format')!r} v{meta.get('format_version')} is not one this "
            f"version of upcycle reads ({FORMAT} v{FORMAT_VERSION})"
        )
    return meta


def load(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an upcycled model saved by `save`, or import a stock Mixtral / Qwen2-MoE / Qwen3-MoE
    directory (weights read through safetensors only)."""
    from transformers import AutoConfig

    from .export import import_stock, is_stock_moe
    from .surgery import convert_structure

    path = Path(path)
    if is_stock_moe(path):  # a stock MoE class's config (our stock exports keep upcycle.json as provenance)
        return import_stock(path, dtype).to(device)
    meta = read_meta(path)
    from .bam import BamPlan, plan_from_dict

    plan = plan_from_dict(meta["plan"], source=str(path / "upcycle.json"))
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
    model = _empty_model(model_class(config), config, stored_dtype)
    if isinstance(plan, BamPlan):  # BAM / BTX: several dense models mixed, attention experts too (bam.py)
        from .bam import convert_structure as bam_structure

        bam_structure(model, plan, meta["moe_layers"], structure=meta)
    else:
        convert_structure(model, plan, meta["moe_layers"], structure=meta)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in meta.get("tied_weights", {})]
    if missing or unexpected:
        raise UpcycleError(
            f"{path}: weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()


def _empty_model(auto_cls, config, dtype: torch.dtype) -> nn.Module:
    """Instantiate a transformers model without spending time on random initialisation."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older layout
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        make = getattr(auto_cls, "from_config", None) or auto_cls._from_config  # Auto classes, or a model class
        model = make(config, dtype=dtype)
    return model


def load_any(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Any model directory the CLI takes: native upcycled and stock MoE (Mixtral, Qwen2/3-MoE, FlexOlmo)
    directories through `load`, dense ones through transformers; safetensors only, fp32 by default."""
    from .export import is_stock_moe

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
