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

Modules: documents (reading and the split), tokens (tokenizing, packing, Batches, load_data),
corpora (the offline corpora). `load_data` and `corpus_tokens`, the entry points the README shows,
are importable from the package.
"""

from upcycle.data.corpora import corpus_tokens
from upcycle.data.tokens import load_data

__all__ = ["corpus_tokens", "load_data"]
