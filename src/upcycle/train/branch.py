"""Branch: N copies of a seed dense model, each trained on its own domain (BAM / BTX step 1).

Each copy trains with `train.train` on its domain's training sequences plus a share of general data
(BAM used 10%: it keeps an expert close to the seed's distribution), and validates on its domain alone.
Data specs are what `upcycle train --data` takes (a text file, a folder, a .jsonl file) or an offline
corpus `corpus:NAME[:MAX_CHARS]` (NAME = python | man | pypi, see data.corpus_documents).

The split is by document with one seed, so a document held out in its domain is held out of the
general mix too (general data defaults to the union of the domains, the seed's mix).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from upcycle.data.corpora import CORPORA, corpus_documents
from upcycle.data.documents import Document, read_documents
from upcycle.data.tokens import PackedData, pack_documents
from upcycle.errors import UpcycleError


def parse_domain(spec: str) -> tuple[str, str]:
    """NAME=DATA -> (name, data spec)."""
    name, sep, data = spec.partition("=")
    if not sep or not name or not data:
        raise UpcycleError(f"--domains: expected NAME=DATA (e.g. code=corpus:python or law=texts/law/), got {spec!r}")
    if not name.replace("-", "").replace("_", "").isalnum():
        raise UpcycleError(f"--domains: the name {name!r} must be letters, digits, - or _ (it names a directory)")
    return name, data


def documents(spec: str, seed: int = 0, text_field: str = "text", chunk_chars: int = 8192) -> list[Document]:
    """Documents of a data spec: corpus:NAME[:MAX_CHARS] or a path."""
    if spec.startswith("corpus:"):
        parts = spec.split(":")
        name = parts[1]
        if name not in CORPORA:
            raise UpcycleError(f"{spec}: unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
        max_chars = int(float(parts[2])) if len(parts) > 2 and parts[2] else None
        return corpus_documents(name, max_chars, seed)
    path = Path(spec)
    if not path.exists():
        raise UpcycleError(f"data path not found: {path}")
    return read_documents(path, text_field, chunk_chars)


def with_general(domain: PackedData, general: PackedData | None, share: float, seed: int = 0) -> PackedData:
    """Domain training sequences plus general ones making up `share` of the result (seeded sample, no
    repeats unless the general data is too small); validation stays the domain's."""
    if not 0 <= share < 1:
        raise UpcycleError(f"--general-share must be in [0, 1), got {share}")
    if general is None or share == 0:
        return domain
    n_dom = domain.train.shape[0]
    n_gen = round(share / (1 - share) * n_dom)
    g = torch.Generator().manual_seed(seed + 1)
    pool = general.train
    idx = torch.randperm(pool.shape[0], generator=g)
    if n_gen > pool.shape[0]:
        idx = idx.repeat(-(-n_gen // pool.shape[0]))
    mixed = torch.cat([domain.train, pool[idx[:n_gen]]])
    mixed = mixed[torch.randperm(mixed.shape[0], generator=g)]
    info = dict(
        domain.info,
        general_share=share,
        general_sequences=n_gen,
        train_sequences=int(mixed.shape[0]),
        general_source=general.info.get("source"),
    )
    return PackedData(mixed, domain.val, info)


def branch_data(
    domains: Sequence[tuple[str, str]],
    tokenizer,
    seq_len: int,
    general: str | None,
    general_share: float,
    val_fraction: float = 0.05,
    seed: int = 0,
    cache_dir=None,
    text_field: str = "text",
    chunk_chars: int = 8192,
) -> dict[str, PackedData]:
    docs = {name: documents(spec, seed, text_field, chunk_chars) for name, spec in domains}
    packed = {
        name: pack_documents(d, tokenizer, seq_len, val_fraction, seed, cache_dir, source=dict(domains)[name])
        for name, d in docs.items()
    }
    gen = None
    if general_share > 0:
        gen_docs = (
            documents(general, seed, text_field, chunk_chars) if general else [x for d in docs.values() for x in d]
        )
        gen = pack_documents(
            gen_docs, tokenizer, seq_len, val_fraction, seed, cache_dir, source=general or "union of the domains"
        )
    return {name: with_general(p, gen, general_share, seed) for name, p in packed.items()}


def branch(
    seed_dir: str | Path,
    data: dict[str, PackedData],
    config,
    out_dir: str | Path,
    tokenizer=None,
    progress: bool = True,
    overwrite: bool = False,
    log=print,
) -> dict[str, Path]:
    """Train one copy of the seed per domain into OUT/NAME (a `train` run; the model in OUT/NAME/model).
    A domain whose run finished before (summary.json) is kept. Returns {name: model directory}."""
    from upcycle.formats.load import load_any

    out_dir = Path(out_dir)
    out: dict[str, Path] = {}
    for name, d in data.items():
        run = out_dir / name
        if (run / "summary.json").is_file() and (run / "model").is_dir() and not overwrite:
            log(f"branch {name}: finished before, keeping {run / 'model'}")
        else:
            log(
                f"branch {name}: {d.info['train_sequences']} sequences ({d.info.get('general_sequences', 0)} "
                f"general) x {config.seq_len} tokens, {config.total_steps()} steps"
            )
            model = load_any(seed_dir, dtype=torch.float32)
            from upcycle.train.loop import train

            train(model, d, config, run, overwrite=True, tokenizer=tokenizer, source_dir=seed_dir, progress=progress)
        out[name] = run / "model"
    (out_dir / "branches.json").write_text(
        json.dumps({"seed": str(seed_dir), "branches": {k: str(v) for k, v in out.items()}}, indent=1) + "\n"
    )
    return out


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
