"""Training data: documents -> tokens -> packed fixed-length sequences, split by document.

    documents   a text file is cut at blank lines into documents of about `chunk_chars` characters
                (ids `path#k`); a folder is every text file under it (sorted, hidden ones skipped);
                a .jsonl file is one document per line (the `text_field` value; id `path:line`)
    split       by document: a document goes to validation when sha256(f"{seed}:{id}") < val_fraction,
                so no document has tokens on both sides, and adding documents never moves another one
    tokens      the model's tokenizer without special tokens, EOS after every document (when the
                tokenizer has one); train documents in a seeded order, then cut into sequences of
                `seq_len` tokens (the tail that does not fill a sequence is dropped)
    batches     `Batches` walks a seeded permutation of the train sequences, epoch after epoch;
                its whole position is one integer (sequences consumed), so a run resumes exactly,
                and each rank of a distributed run takes its own slice of every global batch

Offline corpora for experiments: `corpus_documents("python")` (the Python standard library's source),
`"man"` (English manual pages, roff stripped to text), `"pypi"` (the long descriptions of the
installed Python packages: READMEs in English prose), `"python+packages"` (the standard library and the
source of torch, what torch installs, and numpy: about 80 MB of code), then `pack_documents` or
`corpus_tokens`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .errors import UpcycleError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".tex", ".html", ".c", ".h", ".js", ".ts", ".java",
                 ".go", ".rs", ".cpp", ".json", ".yaml", ".yml", ".toml", ".csv", ".xml", ".sh", ".org", ""}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}


@dataclass(frozen=True)
class Document:
    id: str
    text: str


# ---------------------------------------------------------------------------------------------- reading


def _chunks(text: str, chunk_chars: int) -> list[str]:
    """Cut text at blank lines into pieces of at least chunk_chars characters (the last may be shorter)."""
    if chunk_chars <= 0 or len(text) <= chunk_chars:
        return [text] if text.strip() else []
    parts, cur, size = [], [], 0
    for para in re.split(r"(\n\s*\n)", text):
        cur.append(para)
        size += len(para)
        if size >= chunk_chars:
            parts.append("".join(cur))
            cur, size = [], 0
    if cur and "".join(cur).strip():
        parts.append("".join(cur))
    return [p for p in parts if p.strip()]


def _read_text(path: Path) -> str | None:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        return None  # binary
    return raw.decode("utf-8", errors="replace")


def _jsonl_documents(path: Path, text_field: str, rel: str) -> list[Document]:
    docs = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UpcycleError(f"{path}:{n}: not valid JSON ({e.msg}); every line of a .jsonl file must be "
                                   "one JSON object") from None
            if not isinstance(row, dict) or text_field not in row:
                raise UpcycleError(f"{path}:{n}: no {text_field!r} field; pass --text-field NAME for the field "
                                   "that holds the text")
            text = row[text_field]
            if not isinstance(text, str):
                raise UpcycleError(f"{path}:{n}: field {text_field!r} is {type(text).__name__}, not a string")
            doc_id = f"{rel}:{row['id']}" if "id" in row else f"{rel}:{n}"
            if text.strip():
                docs.append(Document(doc_id, text))
    return docs


def read_documents(path: str | Path, text_field: str = "text", chunk_chars: int = 8192) -> list[Document]:
    """Documents of a text file, a .jsonl file or a folder of them (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise UpcycleError(f"data path not found: {path}")
    if path.is_file():
        files, root = [path], path.parent
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts)
                       and (p.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES))
        root = path
    docs: list[Document] = []
    for f in files:
        rel = str(f.relative_to(root))
        if f.suffix.lower() in JSONL_SUFFIXES:
            docs += _jsonl_documents(f, text_field, rel)
            continue
        text = _read_text(f)
        if text is None:
            if f == path:
                raise UpcycleError(f"{path}: looks binary (it has NUL bytes); give a text, .jsonl or folder path")
            continue
        docs += [Document(f"{rel}#{k}", t) for k, t in enumerate(_chunks(text, chunk_chars))]
    if not docs:
        raise UpcycleError(f"no text found in {path} (text files: {', '.join(sorted(s for s in TEXT_SUFFIXES if s))};"
                           f" JSON lines: .jsonl)")
    return docs


# --------------------------------------------------------------------------------------------- splitting


def doc_hash(doc_id: str, seed: int) -> float:
    """A document's position in [0, 1): sha256 of the seed and the id."""
    h = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_documents(docs: Sequence[Document], val_fraction: float, seed: int = 0
                    ) -> tuple[list[Document], list[Document]]:
    """(train, validation) by document hash. With val_fraction > 0 and at least two documents, the
    validation side is never empty (the document of lowest hash goes there) and train never either;
    a single document is all train."""
    if not 0 <= val_fraction < 1:
        raise UpcycleError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if len({d.id for d in docs}) != len(docs):
        raise UpcycleError("document ids are not unique; the split needs one id per document")
    if len(docs) == 1:  # nothing to hold out without losing all the training data
        return list(docs), []
    keys = {d.id: doc_hash(d.id, seed) for d in docs}
    val = [d for d in docs if keys[d.id] < val_fraction]
    train = [d for d in docs if keys[d.id] >= val_fraction]
    if val_fraction > 0 and len(docs) >= 2:
        if not val:
            first = min(train, key=lambda d: keys[d.id])
            train, val = [d for d in train if d is not first], [first]
        if not train:
            last = max(val, key=lambda d: keys[d.id])
            val, train = [d for d in val if d is not last], [last]
    return train, val


# -------------------------------------------------------------------------------------- tokens, packing


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


def tokenize_documents(docs: Sequence[Document], tokenizer, cache_dir: str | Path | None = None,
                       batch: int = 256) -> list[list[int]]:
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
            saved = torch.load(cache, weights_only=True, map_location="cpu")
            lens = saved["lengths"].tolist()
            flat = saved["ids"].tolist()
            out, pos = [], 0
            for n in lens:
                out.append(flat[pos:pos + n])
                pos += n
            return out
    out = []
    for i in range(0, len(docs), batch):
        enc = tokenizer([d.text for d in docs[i:i + batch]], add_special_tokens=False)["input_ids"]
        out += [list(ids) + ([sep] if sep is not None else []) for ids in enc]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{id(out)}")
        torch.save({"lengths": torch.tensor([len(x) for x in out]),
                    "ids": torch.tensor([t for x in out for t in x], dtype=torch.int64)}, tmp)
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


def pack_documents(docs: Sequence[Document], tokenizer, seq_len: int, val_fraction: float = 0.05, seed: int = 0,
                   cache_dir: str | Path | None = None, source: str = "data") -> PackedData:
    """Split by document, tokenise, shuffle the documents of each side (seeded) and pack."""
    if seq_len < 2:
        raise UpcycleError(f"seq_len must be at least 2, got {seq_len}")
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    g = torch.Generator().manual_seed(seed)
    train_docs = [train_docs[i] for i in torch.randperm(len(train_docs), generator=g).tolist()]
    ids = tokenize_documents(list(train_docs) + list(val_docs), tokenizer, cache_dir)
    train = pack(ids[: len(train_docs)], seq_len)
    val = pack(ids[len(train_docs):], seq_len)
    if train.shape[0] == 0:
        total = sum(len(x) for x in ids[: len(train_docs)])
        raise UpcycleError(f"{source}: {total} training tokens, fewer than one sequence of {seq_len}; give more "
                           "text or a shorter --seq-len")
    info = {"source": source, "documents": len(docs), "train_documents": len(train_docs),
            "val_documents": len(val_docs), "train_sequences": int(train.shape[0]),
            "val_sequences": int(val.shape[0]), "seq_len": seq_len, "seed": seed, "val_fraction": val_fraction,
            "val_ids_sha256": hashlib.sha256("\n".join(sorted(d.id for d in val_docs)).encode()).hexdigest()}
    return PackedData(train, val, info)


def load_data(path: str | Path, tokenizer, seq_len: int, val_fraction: float = 0.05, seed: int = 0,
              text_field: str = "text", chunk_chars: int = 8192, cache_dir: str | Path | None = None) -> PackedData:
    """`read_documents` then `pack_documents`: what `upcycle train --data PATH` does."""
    docs = read_documents(path, text_field, chunk_chars)
    return pack_documents(docs, tokenizer, seq_len, val_fraction, seed, cache_dir, source=str(path))


# ------------------------------------------------------------------------------------------------ batches


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

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.seqs.shape[0], generator=g), epoch
        return self._perm

    def _indices(self, start: int, n: int) -> list[int]:
        N = self.seqs.shape[0]
        out = []
        for k in range(start, start + n):
            out.append(int(self._perm_for(k // N)[k % N]))
        return out

    def next_step(self, accum: int) -> list[torch.Tensor]:
        """This rank's `accum` micro-batches of the next optimizer step; advances the position."""
        mbs = []
        for m in range(accum):
            start = self.consumed + (m * self.world + self.rank) * self.batch
            mbs.append(self.seqs[self._indices(start, self.batch)])
        self.consumed += accum * self.world * self.batch
        return mbs

    @property
    def epoch(self) -> float:
        return self.consumed / self.seqs.shape[0]

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "num_sequences": int(self.seqs.shape[0])}

    def load_state_dict(self, state: dict) -> None:
        if state["num_sequences"] != self.seqs.shape[0] or state["seed"] != self.seed:
            raise UpcycleError(f"the checkpoint's data ({state['num_sequences']} sequences, seed {state['seed']}) is "
                               f"not this data ({self.seqs.shape[0]} sequences, seed {self.seed}); resume with the "
                               "same --data, --seq-len, --val-fraction and --seed")
        self.consumed = int(state["consumed"])


# ------------------------------------------------------------------------------------ offline corpora

CORPORA = ("python", "man", "pypi", "python+packages")
# The installed packages whose source joins the standard library in "python+packages": torch (pinned to
# 2.13.0 by the README and CI) and what it installs, plus numpy; tests are left out. Their versions are
# part of the corpus's identity (`corpus_fingerprint`).
CORPUS_PACKAGES = ("torch", "sympy", "mpmath", "networkx", "numpy")
_SKIP_DIRS = {"test", "tests", "testing", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__"}


def python_stdlib_documents(max_files: int | None = None) -> list[Document]:
    """The running Python's standard-library source files (no tests, no site-packages): real code."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not {"test", "tests", "idle_test", "site-packages",
                                                          "dist-packages", "lib2to3", "__pycache__"}
                   & set(p.relative_to(root).parts))
    docs = []
    for f in files[:max_files]:
        text = _read_text(f)
        if text and text.strip():
            docs.append(Document(f"stdlib/{f.relative_to(root)}", text))
    return docs


def package_source_documents(packages: Sequence[str] = CORPUS_PACKAGES) -> list[Document]:
    """The .py source of installed packages (their test folders left out), one document per file, with
    ids `pkg/<package>/<path>`; a package that is not installed is skipped."""
    import importlib.util

    docs = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts)
                       and not p.name.startswith("test_"))
        for f in files:
            text = _read_text(f)
            if text and text.strip():
                docs.append(Document(f"pkg/{name}/{f.relative_to(root)}", text))
    return docs


def corpus_fingerprint(name: str, docs: Sequence[Document]) -> dict:
    """What a corpus was on this machine: its name, size, the versions of the packages it reads and a
    sha256 of its documents (ids and texts), so two machines can tell whether they trained on the same text."""
    from importlib import metadata

    h = hashlib.sha256()
    for d in docs:
        h.update(d.id.encode() + b"\0" + d.text.encode("utf-8", errors="replace") + b"\0")
    versions = {"python": sys.version.split()[0]}
    if name == "python+packages":
        for pkg in CORPUS_PACKAGES:
            try:
                versions[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                versions[pkg] = None
    return {"corpus": name, "documents": len(docs), "chars": sum(len(d.text) for d in docs),
            "sha256": h.hexdigest(), "versions": versions}


_ROFF_ESCAPES = [(re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\s[+-]?\d"), ""),
                 (re.compile(r"\\\((em|en)"), "-"), (re.compile(r"\\\(aq"), "'"), (re.compile(r"\\\((lq|rq|dq)"), '"'),
                 (re.compile(r"\\\(bu"), "*"), (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""), (re.compile(r"\\[-]"), "-"),
                 (re.compile(r"\\[&|^%c]"), ""), (re.compile(r"\\e"), lambda m: "\\"), (re.compile(r"\\ "), " "),
                 (re.compile(r"\\\*(\(..|\[[^\]]*\]|.)"), ""), (re.compile(r"\\n(\(..|\[[^\]]*\]|.)"), "")]
_TEXT_MACROS = {".SH", ".SS", ".B", ".I", ".BI", ".BR", ".IR", ".RB", ".RI", ".IB", ".TP", ".IP", ".Nm", ".Nd",
                ".Sh", ".Ss", ".It", ".Xr", ".Fl", ".Ar", ".Pa", ".Em", ".Sy"}


def roff_to_text(src: str) -> str:
    """Plain text of a manual page source: requests dropped, text-carrying macros kept, escapes removed."""
    out = []
    for line in src.splitlines():
        if line.startswith((".\\\"", "'\\\"", '.\\"')):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line.partition(" ")
            if macro in (".SH", ".Sh"):
                out.append("")
            if macro in (".IP", ".TP") and rest:  # tag and indent: keep the tag only
                rest = rest.split('" ')[0] if rest.startswith('"') else rest.split(" ")[0]
            if macro in _TEXT_MACROS and rest:
                line = rest.replace('"', "")
            elif macro in (".PP", ".LP", ".P", ".sp", ".Pp"):
                out.append("")
                continue
            else:
                continue
        for pat, rep in _ROFF_ESCAPES:
            line = pat.sub(rep, line)  # noqa: PLW2901
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def man_page_documents(sections: Sequence[str] = ("1", "5", "7", "8"), root: str | Path = "/usr/share/man",
                       max_chars: int | None = None, seed: int = 0, min_chars: int = 500,
                       skip_prefixes: Sequence[str] = ("gcloud",)) -> list[Document]:
    """English manual pages installed on this machine (gzipped roff under /usr/share/man/manN), as text.
    Machine-generated families (gcloud's 16k near-identical pages) are skipped. With max_chars, pages
    are read in a seeded order until about that many characters (reading all takes a while)."""
    root = Path(root)
    files = [f for s in sections for f in sorted((root / f"man{s}").glob("*"))
             if f.is_file() and not f.name.startswith(tuple(skip_prefixes))]
    if max_chars is not None:
        files.sort(key=lambda f: doc_hash(f.name, seed))
    docs, total = [], 0
    for f in files:
        if max_chars is not None and total >= max_chars:
            break
        try:
            raw = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        except (OSError, EOFError):
            continue
        src = raw.decode("utf-8", errors="replace")
        if src.lstrip().startswith(".so "):  # a redirect to another page
            continue
        text = roff_to_text(src)
        if len(text) >= min_chars:
            docs.append(Document(f"man/{f.parent.name}/{f.name}", text))
            total += len(text)
    return sorted(docs, key=lambda d: d.id)


def pypi_readme_documents(min_chars: int = 1000) -> list[Document]:
    """The long descriptions (READMEs) of the Python packages installed in this environment."""
    from importlib import metadata

    docs, seen = [], set()
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if not name or name in seen or len(body) < min_chars:
            continue
        seen.add(name)
        docs.append(Document(f"pypi/{name}", body))
    return sorted(docs, key=lambda d: d.id)


def corpus_documents(name: str, max_chars: int | None = None, seed: int = 0) -> list[Document]:
    """Documents of an offline corpus ("python", "man", "pypi"); with max_chars, a seeded sample of
    documents adding up to about that many characters (whole documents, so the split stays clean)."""
    if name == "python":
        docs = python_stdlib_documents()
    elif name == "man":
        docs = man_page_documents(max_chars=max_chars, seed=seed)
    elif name == "pypi":
        docs = pypi_readme_documents()
    elif name == "python+packages":
        docs = python_stdlib_documents() + package_source_documents()
    else:
        raise UpcycleError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    if not docs:
        raise UpcycleError(f"corpus {name!r} is empty on this machine ({sys.platform}); pass your own text with "
                           "--data")
    if max_chars is not None:
        docs = sorted(docs, key=lambda d: doc_hash(d.id, seed + 7919))
        out, total = [], 0
        for d in docs:
            if total >= max_chars:
                break
            out.append(d)
            total += len(d.text)
        docs = sorted(out, key=lambda d: d.id)
    return docs


def corpus_tokens(name: str, tokenizer, seq_len: int = 256, val_fraction: float = 0.05, seed: int = 0,
                  max_chars: int | None = 2_000_000, cache_dir: str | Path | None = None) -> PackedData:
    """Train/validation token tensors of an offline corpus, split by document (see `pack_documents`)."""
    docs = corpus_documents(name, max_chars, seed)
    return pack_documents(docs, tokenizer, seq_len, val_fraction, seed, cache_dir, source=f"corpus:{name}")
