"""Tokens: documents tokenized (EOS after each), packed into fixed-length sequences, and `Batches`,
the seeded resumable walk over them (see the package docstring)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from upcycle.data.documents import Document, read_documents, split_documents
from upcycle.errors import UpcycleError


def separator_id(tokenizer) -> int | None:
    """EOS between documents; the BOS token if there is no EOS; nothing if there is neither."""
    for name in ("eos_token_id", "bos_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None:
            return int(tid)
    return None


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(separator_id(tokenizer)).encode())
    return h.hexdigest()


def _read_cache(cache: Path, n_docs: int) -> list[list[int]] | None:
    """A token cache file's documents, or None when it is damaged (it is only a cache: it is rebuilt)."""
    import warnings

    from upcycle.errors import UpcycleWarning

    try:
        saved = torch.load(cache, weights_only=True, map_location="cpu")
        lens = saved["lengths"].tolist()
        flat = saved["ids"].tolist()
        if len(lens) != n_docs or sum(lens) != len(flat) or min(lens, default=0) < 0:
            raise ValueError("lengths do not match the ids")
    except Exception as e:  # noqa: BLE001 - zip, pickle and shape errors alike
        warnings.warn(f"{cache}: damaged token cache ({type(e).__name__}); rebuilding it", UpcycleWarning, stacklevel=3)
        return None
    out, pos = [], 0
    for n in lens:
        out.append(flat[pos : pos + n])
        pos += n
    return out


def tokenize_documents(
    docs: Sequence[Document], tokenizer, cache_dir: str | Path | None = None, batch: int = 256
) -> list[list[int]]:
    """Token ids of each document, followed by the separator. Cached on disk (keyed by the texts and the
    tokenizer) when cache_dir is given."""
    sep = separator_id(tokenizer)
    cache = None
    if cache_dir is not None:
        h = hashlib.sha256(_tokenizer_fingerprint(tokenizer).encode())
        for d in docs:
            h.update(d.id.encode() + b"\0" + d.text.encode("utf-8", errors="replace") + b"\0")
        cache = Path(cache_dir) / f"{h.hexdigest()[:32]}.pt"
        if cache.is_file():
            cached = _read_cache(cache, len(docs))
            if cached is not None:
                return cached
    out = []
    for i in range(0, len(docs), batch):
        enc = tokenizer([d.text for d in docs[i : i + batch]], add_special_tokens=False)["input_ids"]
        out += [list(ids) + ([sep] if sep is not None else []) for ids in enc]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{id(out)}")
        torch.save(
            {
                "lengths": torch.tensor([len(x) for x in out]),
                "ids": torch.tensor([t for x in out for t in x], dtype=torch.int64),
            },
            tmp,
        )
        tmp.replace(cache)
    return out


def pack(token_lists: Iterable[list[int]], seq_len: int) -> torch.Tensor:
    """Concatenate and cut into (N, seq_len) int64; the incomplete tail is dropped."""
    flat = torch.tensor([t for ids in token_lists for t in ids], dtype=torch.int64)
    n = flat.numel() // seq_len
    return flat[: n * seq_len].view(n, seq_len)


@dataclass
class PackedData:
    """Train and validation sequences (N, seq_len) from disjoint sets of documents."""

    train: torch.Tensor
    val: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]


def pack_documents(
    docs: Sequence[Document],
    tokenizer,
    seq_len: int,
    val_fraction: float = 0.05,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    source: str = "data",
) -> PackedData:
    """Split by document, tokenise, shuffle the documents of each side (seeded) and pack."""
    if seq_len < 2:
        raise UpcycleError(f"seq_len must be at least 2, got {seq_len}")
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    g = torch.Generator().manual_seed(seed)
    train_docs = [train_docs[i] for i in torch.randperm(len(train_docs), generator=g).tolist()]
    ids = tokenize_documents(list(train_docs) + list(val_docs), tokenizer, cache_dir)
    train = pack(ids[: len(train_docs)], seq_len)
    val = pack(ids[len(train_docs) :], seq_len)
    if train.shape[0] == 0:
        total = sum(len(x) for x in ids[: len(train_docs)])
        raise UpcycleError(
            f"{source}: {total} training tokens, fewer than one sequence of {seq_len}; give more "
            "text or a shorter --seq-len"
        )
    info = {
        "source": source,
        "documents": len(docs),
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "train_sequences": int(train.shape[0]),
        "val_sequences": int(val.shape[0]),
        "seq_len": seq_len,
        "seed": seed,
        "val_fraction": val_fraction,
        "val_ids_sha256": hashlib.sha256("\n".join(sorted(d.id for d in val_docs)).encode()).hexdigest(),
    }
    return PackedData(train, val, info)


def load_data(
    path: str | Path,
    tokenizer,
    seq_len: int,
    val_fraction: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
    chunk_chars: int = 8192,
    cache_dir: str | Path | None = None,
) -> PackedData:
    """`read_documents` then `pack_documents`: what `upcycle train --data PATH` does."""
    docs = read_documents(path, text_field, chunk_chars)
    return pack_documents(docs, tokenizer, seq_len, val_fraction, seed, cache_dir, source=str(path))


class Batches:
    """Seeded, restartable stream of micro-batches of train sequences.

    Global sequence k of the stream is perm_e[k mod N] with e = k div N and perm_e a permutation seeded by
    (seed, e). A step of a run with `world` ranks and `accum` micro-batches consumes world*accum*batch
    sequences; rank r's micro-batch m is the slice starting at (m*world + r)*batch. The state is `consumed`.
    """

    def __init__(self, sequences: torch.Tensor, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        if sequences.shape[0] == 0:
            raise UpcycleError("no training sequences")
        self.seqs, self.batch, self.seed, self.rank, self.world = sequences, batch_size, seed, rank, world
        self.consumed = 0
        self._perm_epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of the train sequences in `epoch` (a seeded permutation of their indices)."""
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.seqs.shape[0], generator=g), epoch
        return self._perm

    def indices(self, start: int, n: int) -> list[int]:
        N = self.seqs.shape[0]
        out = []
        for k in range(start, start + n):
            out.append(int(self.permutation(k // N)[k % N]))
        return out

    def next_step(self, accum: int) -> list[torch.Tensor]:
        """This rank's `accum` micro-batches of the next optimizer step; advances the position."""
        mbs = []
        for m in range(accum):
            start = self.consumed + (m * self.world + self.rank) * self.batch
            mbs.append(self.seqs[self.indices(start, self.batch)])
        self.consumed += accum * self.world * self.batch
        return mbs

    @property
    def epoch(self) -> float:
        return self.consumed / self.seqs.shape[0]

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "num_sequences": int(self.seqs.shape[0])}

    def load_state_dict(self, state: dict) -> None:
        if state["num_sequences"] != self.seqs.shape[0] or state["seed"] != self.seed:
            raise UpcycleError(
                f"the checkpoint's data ({state['num_sequences']} sequences, seed {state['seed']}) is "
                f"not this data ({self.seqs.shape[0]} sequences, seed {self.seed}); resume with the "
                "same --data, --seq-len, --val-fraction and --seed"
            )
        self.consumed = int(state["consumed"])
