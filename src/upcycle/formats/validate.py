"""Inputs checked before anything is computed or written: config.json (readable, sizes positive), the
safetensors files (index, shard names, headers, byte ranges) and their tensors against the model the config
describes (names, shapes, dtypes, expert counts). Every loader of a model directory goes through here.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from upcycle.errors import UpcycleError, nonfinite
from upcycle.io.dirs import read_json_object
from upcycle.io.safetensors import SafetensorsSource

# config.json fields that count something: each must be a positive integer where present
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "d_model",
    "d_ff",
    "d_kv",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
    "image_size",
    "patch_size",
    "num_channels",
    "moe_intermediate_size",
    "num_experts",
    "num_local_experts",
)


def read_config(model_dir: str | Path):
    """The transformers config of a model directory, read without remote code; sizes checked."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UpcycleError(f"model directory not found: {model_dir}")
    f = model_dir / "config.json"
    if not f.is_file():
        raise UpcycleError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    check_sizes(read_json_object(f, "re-download or re-save the model"), f)
    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - transformers raises several types for unreadable configs
        raise UpcycleError(f"{f}: cannot read it ({str(e).splitlines()[0]})") from None


def check_sizes(raw: dict, source: Path | str) -> None:
    """Every size field of a config.json (and of its text/vision sub-configs) is a positive integer."""
    for sub in [raw, *(v for v in raw.values() if isinstance(v, dict) and "hidden_size" in v)]:
        for k in SIZE_FIELDS:
            v = sub.get(k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise UpcycleError(f"{source}: {k} is {v!r}; it must be a positive integer (fix config.json)")


def open_weights(model_dir: str | Path) -> SafetensorsSource:
    """The directory's safetensors files with every header read and checked (a truncated or corrupt file,
    an invalid index and a shard outside the directory are refused here)."""
    return SafetensorsSource(model_dir)


def expected_tensors(model: nn.Module) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], set[str]]:
    """({name: (shape, dtype)} of the tensors a checkpoint of `model` holds, names tied to another)."""
    from upcycle.io.models import unique_state_dict

    unique, tied = unique_state_dict(model)
    return {k: (tuple(v.shape), v.dtype) for k, v in unique.items()}, set(tied)


def check_tensors(
    source: SafetensorsSource, model: nn.Module, what: str = "the config", allow_missing: set[str] = frozenset()
) -> None:
    """The checkpoint's tensors are exactly the model's: no tensor missing or extra, each of its shape,
    each a floating-point tensor."""
    want, tied = expected_tensors(model)
    have = source.tensors
    missing = [k for k in want if k not in have and k not in allow_missing]
    extra = [k for k in have if k not in want and k not in tied]
    where = source.dir
    if missing:
        raise UpcycleError(
            f"{where}: tensor {missing[0]} is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f", which {what} needs; the checkpoint is incomplete: re-download or re-save it"
        )
    if extra:
        raise UpcycleError(
            f"{where}: tensor {extra[0]} ({have[extra[0]].file.name}) is not part of the model {what} describes"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + "; the weights and the config do not belong together"
        )
    for k, (shape, _) in want.items():
        if k in have and tuple(have[k].shape) != shape:
            raise UpcycleError(
                f"{have[k].file}: tensor {k} has shape {list(have[k].shape)} where {what} gives {list(shape)}; "
                "the weights and the config do not belong together"
            )
    for k, (_, dtype) in want.items():
        if k in have and dtype.is_floating_point and not have[k].dtype.is_floating_point:
            raise UpcycleError(f"{have[k].file}: tensor {k} is {have[k].dtype}, not floating point; re-save the model")


def check_native(model_dir: str | Path) -> tuple[Any, Any, SafetensorsSource]:
    """(record, config, opened weights) of a native upcycled directory, checked whole before any tensor is read:
    upcycle.json, config.json, every header, and each tensor's name, shape and dtype against the model that the
    config and the plan describe (a meta-device model: no memory). The caller closes the weights."""
    from upcycle.formats.native import read_record
    from upcycle.io.models import model_class
    from upcycle.methods.registry import rebuild

    model_dir = Path(model_dir)
    record = read_record(model_dir)
    config = read_config(model_dir)
    cls = model_class(config)
    with torch.device("meta"):
        skeleton = (getattr(cls, "from_config", None) or cls._from_config)(config)
        rebuild(record, skeleton)
    source = open_weights(model_dir)
    try:
        check_tensors(source, skeleton, "config.json and upcycle.json", allow_missing=set(record.tied_weights))
    except BaseException:
        source.close()
        raise
    return record, config, source


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own load reports off while we check (our error says what matters)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_pretrained(model_dir: str | Path, dtype: Any = torch.float32, config: Any = None) -> nn.Module:
    """A dense (transformers) model directory, safetensors only, checked first: config sizes, every header,
    and the tensors against the model the config describes; a tensor the checkpoint lacks is an error,
    never a random initialisation."""
    from upcycle.io.models import model_class

    model_dir = Path(model_dir)
    config = config if config is not None else read_config(model_dir)
    if (model_dir / "upcycle.json").is_file():
        raise UpcycleError(f"{model_dir} is an upcycled (MoE) model, not a dense one; give the dense checkpoint")
    cls = model_class(config)
    with open_weights(model_dir) as source:
        with torch.device("meta"):
            make = getattr(cls, "from_config", None) or cls._from_config
            skeleton = make(config)
        _check_shapes(source, skeleton)
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(
                model_dir, config=config, dtype=dtype, use_safetensors=True, output_loading_info=True
            )
    except Exception as e:  # noqa: BLE001 - transformers' many exception types, one clear line
        raise UpcycleError(f"{model_dir}: cannot load the model ({str(e).splitlines()[0]})") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise UpcycleError(
            f"{model_dir}: tensor {missing[0]} is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; transformers would initialise it at random: re-download or re-save the checkpoint"
        )
    for name, p in model.named_parameters():
        nonfinite(name, p.detach(), str(model_dir))
    return model.eval()


def _check_shapes(source: SafetensorsSource, skeleton: nn.Module) -> None:
    """Shapes and dtypes of the tensors a dense checkpoint and its config both name (transformers renames
    some legacy keys: names alone are checked after loading)."""
    want = {k: v for k, v in skeleton.state_dict().items()}
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    for k, info in source.tensors.items():
        ref = want.get(k, want.get(f"{prefix}.{k}") if prefix else None)
        if ref is None:
            continue
        if tuple(info.shape) != tuple(ref.shape):
            raise UpcycleError(
                f"{info.file}: tensor {k} has shape {list(info.shape)} where config.json gives {list(ref.shape)}; "
                "the weights and the config do not belong together"
            )
        if ref.dtype.is_floating_point and not info.dtype.is_floating_point:
            raise UpcycleError(f"{info.file}: tensor {k} is {info.dtype}, not floating point; re-save the model")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(d: str | Path | None) -> bool:
    return d is not None and any((Path(d) / n).is_file() for n in TOKENIZER_FILES)


def load_tokenizer(*dirs: str | Path | None, vocab_size: int | None = None, flag: str = "--tokenizer"):
    """The tokenizer of the first directory that has tokenizer files; a clear error when none has or it
    cannot be read, and when it has more tokens than the model's vocabulary (ids past the embedding)."""
    from transformers import AutoTokenizer

    tried = [Path(d) for d in dirs if d is not None]
    tok_dir = next((d for d in tried if has_tokenizer(d)), None)
    if tok_dir is None:
        raise UpcycleError(
            f"no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}) in {' or '.join(map(str, tried))}; pass {flag} DIR"
        )
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(tok_dir)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for unreadable tokenizer files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UpcycleError(f"{tok_dir}: cannot load the tokenizer ({msg}); pass {flag} DIR") from None
    if vocab_size is not None and len(tok) > vocab_size:
        raise UpcycleError(
            f"{tok_dir}: the tokenizer has {len(tok)} tokens, more than the model's vocabulary of {vocab_size}: "
            f"its ids past {vocab_size - 1} have no embedding; pass the model's own tokenizer with {flag} DIR"
        )
    return tok
