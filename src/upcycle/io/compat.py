"""Files that transformers 5 writes, made readable by transformers 4.x and the tools that pin it
(llama.cpp's converter pins 4.57), without changing what transformers 5 reads from them.

- config.json: transformers 5 writes rotary settings only as `rope_parameters`; 4.x ignores that key
  and falls back to its class's default `rope_theta` (not SmolLM2's 1e5), which loads without an
  error and computes garbage. `portable_config` adds the 4.x fields beside it:
  `rope_theta`, `partial_rotary_factor` and `rope_scaling` (the non-default rope types).
- tokenizer_config.json: transformers 5 names its tokenizers-library class "TokenizersBackend", which
  4.x does not know; 4.x's name for the same thing is "PreTrainedTokenizerFast", which 5 still reads
  (an alias of the same class there). Both build the tokenizer from tokenizer.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# transformers 5 tokenizer class -> the class 4.x (and 5) read for the same tokenizer.json.
TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def portable_config(cfg: dict) -> dict:
    """`cfg` (a config.json dict) with the transformers 4.x rotary fields added where it has only
    transformers 5's `rope_parameters`; values already there are kept. Per-layer-type rope settings
    (a dict of dicts, as Gemma-3 writes) have no 4.x form and are left alone."""
    out = dict(cfg)
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict) or "rope_theta" not in rp:
        return out
    out.setdefault("rope_theta", rp["rope_theta"])
    if "partial_rotary_factor" in rp:
        out.setdefault("partial_rotary_factor", rp["partial_rotary_factor"])
    if rp.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if out.get("rope_scaling") is None:
            out["rope_scaling"] = scaling
    return out


def portable_tokenizer_config(cfg: dict) -> dict:
    """`cfg` (a tokenizer_config.json dict) with a tokenizer class that transformers 4.x knows."""
    out = dict(cfg)
    if out.get("tokenizer_class") in TOKENIZER_CLASSES:
        out["tokenizer_class"] = TOKENIZER_CLASSES[out["tokenizer_class"]]
    return out


def make_portable(directory: Path) -> list[str]:
    """Rewrite `directory`'s config.json and tokenizer_config.json in place (where present) so that
    transformers 4.x reads them as 5 does. Returns the names of the files it changed."""
    changed = []
    for name, fix in (("config.json", portable_config), ("tokenizer_config.json", portable_tokenizer_config)):
        path = Path(directory) / name
        if not path.is_file():
            continue
        cfg = json.loads(path.read_text(encoding="utf-8"))
        new = fix(cfg)
        if new != cfg:
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one
            changed.append(name)
    return changed
