"""Streaming safetensors -> safetensors upcycling, for checkpoints larger than RAM.

    source headers --> output items (name, shape, dtype, producer) --> shards written tensor by tensor

Nothing holds the model. `SafetensorsSource` parses the headers of the source shards; `read(name)`
returns one tensor as a view of the memory-mapped file (no copy), and the pages of the previous
tensors leave our resident memory at the next read. `upcycle_items` lists the tensors of the
upcycled model in the order of its state dict, each with a producer that builds it when called.
`write_items` computes every shard and every safetensors header from shapes alone, then writes each
tensor as it is produced, through `SequentialWriter` (O_DIRECT via two aligned staging buffers and
a writer thread, where the filesystem allows). A copied expert stack (E, F, D) is an expanded view
of the dense tensor, written E times from the same pages. Peak memory is therefore about one source
tensor (two when casting with --dtype) plus 32 MB of staging; noise initialisation builds the
(E, ...) stack, as `surgery.init_experts` does: (E + 1) tensors.

The output is byte for byte what `upcycle(model, plan)` followed by `native.save` writes: the same
tensors, names, dtypes, shard split and files (only upcycle.json's "created" time differs), because
the state-dict order and tied weights come from the same transformers model class, built on the
meta device (no memory), and the expert and router values come from `surgery`'s own initialisers.

The per-tensor stream is pluggable: `stream_upcycle(..., transform=f)` passes the native items
through `f` (an iterable of `Item` in, an iterable of `Item` out: rename, fuse, drop) and
`write_config` replaces the config.json writer, e.g. for stock MoE formats."""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn

from upcycle.errors import UpcycleError
from upcycle.io.compat import make_portable
from upcycle.io.dirs import (
    atomic_dir,
    check_disk_space,
    copy_side_files,
    fsync_path,
    parse_size,
    read_json_object,
    refuse_existing,
    sha256_files,
    side_files,
)
from upcycle.io.models import unique_state_dict
from upcycle.io.safetensors import SafetensorsSource
from upcycle.io.writer import Item, output_bytes, tensor_items, write_items
from upcycle.methods.plan import UpcyclePlan
from upcycle.methods.record import ConversionRecord
from upcycle.methods.registry import record_from_json
from upcycle.methods.streaming import resolve_dtype, upcycle_items, upcycled_structure

Transform = Callable[[Iterator[Item]], Iterable[Item]]


ConfigWriter = Callable[[Any, Path], None]


def stream_upcycle(
    model_dir: str | Path,
    plan: UpcyclePlan,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    fsync: bool = True,
    transform: Transform | None = None,
    write_config: ConfigWriter | None = None,
    config: Any = None,
) -> Path:
    """Upcycle a safetensors checkpoint directory to `out_dir` without loading the model.

    Peak memory is about one source tensor (plus its cast, or the (E, ...) stack with noise init).
    The output equals `native.save(upcycle(model, plan), ...)`'s. Writes go to a temporary sibling
    directory renamed into place at the end; with `fsync` every file and both directories are
    flushed to disk first.

    transform: maps the stream of native items to another (names, shapes, values), e.g. a stock
        MoE layout; items must announce their shape and dtype truthfully.
    write_config: `f(config, directory)` writes config.json instead of the native one (the base
        config with an "upcycle" entry). The config it gets already has `config.upcycle` set.
    config: the source's config when the caller has read it already (a copy is used); else read here.
    """
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    refuse_existing(out_dir, overwrite)
    config = AutoConfig.from_pretrained(model_dir) if config is None else copy.deepcopy(config)
    from upcycle.methods.surgery import applied_plan

    plan = applied_plan(plan, config)
    with SafetensorsSource(model_dir) as source:
        items, tied, layers = upcycle_items(source, plan, config, dtype)
        config.dtype = resolve_dtype(config, source, dtype)
        if transform is not None:
            items = list(transform(iter(items)))
        limit = parse_size(max_shard_size)
        side = side_files(model_dir)
        need = output_bytes(items, limit) + sum(f.stat().st_size for f in side)
        check_disk_space(out_dir, need)
        with ThreadPoolExecutor(1) as pool, atomic_dir(out_dir, overwrite, [model_dir]) as tmp:
            hashing = pool.submit(sha256_files, source.files)  # overlaps the writes (hashlib frees the GIL)
            structure = upcycled_structure(plan, config)
            record = ConversionRecord(
                plan, layers, structure, tied, {"path": str(model_dir), "weights": {}}, versions()
            )
            config.upcycle = record.config_entry()
            (write_config or (lambda c, d: c.save_pretrained(d)))(config, tmp)
            total = sum(it.nbytes for it in items)
            with tqdm(total=total, unit="B", unit_scale=True, desc="writing shards", disable=not progress) as bar:
                write_items(items, tmp, limit, bar, fsync=fsync)
            record.source["weights"] = hashing.result()
            write_record(record, tmp)
            copy_side_files(model_dir, tmp)
            make_portable(tmp)  # transformers 4.x and the engines that pin it read config and tokenizer right
            if fsync:
                for f in tmp.iterdir():
                    if not f.name.endswith(".safetensors"):
                        fsync_path(f)
                fsync_path(tmp)
    if fsync:
        fsync_path(out_dir.parent)
    return out_dir


FORMAT = "upcycle-native"


FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    import safetensors
    import transformers

    from upcycle._version import __version__

    return {
        "upcycle": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


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
    check_disk_space(out_dir, nbytes)
    from upcycle.methods.surgery import applied_plan, structure_of

    plan = applied_plan(plan, model.config, model)
    layers = _moe_layer_indices(model)
    structure = structure_of(model)
    with atomic_dir(out_dir, overwrite, [source_dir]) as tmp:
        model.config.architectures = [type(model).__name__]  # the class `load` rebuilds
        source = {"path": str(source_dir) if source_dir else None, "weights": source_hashes or {}}
        record = ConversionRecord(plan, layers, structure, tied, source, versions())
        model.config.upcycle = record.config_entry()
        model.config.save_pretrained(tmp)
        bar = tqdm(total=nbytes, unit="B", unit_scale=True, desc="writing shards", disable=not progress)
        with bar:
            # the streaming converter's writer: one shard rule, one header encoder, byte identity by construction
            write_items(tensor_items(tensors), tmp, parse_size(max_shard_size), bar, fsync=False)
        write_record(record, tmp)
        if source_dir is not None:
            copy_side_files(Path(source_dir), tmp)
        make_portable(tmp)
    return out_dir


def _moe_layer_indices(model: nn.Module) -> list[int] | dict[str, list[int]]:
    """MoE layer indices: a list, or {stack: list} for models with several stacks (T5)."""
    from upcycle.adapters import stacks_for
    from upcycle.moe.block import MoEBlock

    stacks = stacks_for(model.config, model=model)
    found = {
        a.stack: [i for i, b in enumerate(a.layer_list(model)) if isinstance(a.get_mlp(b), MoEBlock)] for a in stacks
    }
    return found[stacks[0].stack] if len(stacks) == 1 else found


def write_record(record: ConversionRecord, out_dir: Path) -> None:
    """upcycle.json: the format's header, then the conversion record."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **record.to_json()}
    (Path(out_dir) / "upcycle.json").write_text(json.dumps(meta, indent=2) + "\n")


def read_record(path: Path) -> ConversionRecord:
    """The conversion record of a native directory (its upcycle.json, format checked)."""
    return record_from_json(read_meta(path), source=str(Path(path) / "upcycle.json"))


def read_meta(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise UpcycleError(f"model directory not found: {path}")
    f = path / "upcycle.json"
    if not f.is_file():
        raise UpcycleError(
            f"{path} has no upcycle.json: not an upcycled model (for a dense model use transformers' from_pretrained)"
        )
    meta = read_json_object(f, "the directory is damaged: convert the model again")
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise UpcycleError(
            f"{f}: format {meta.get('format')!r} v{meta.get('format_version')} is not one this "
            f"version of upcycle reads ({FORMAT} v{FORMAT_VERSION})"
        )
    return meta
