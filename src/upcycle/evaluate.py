"""Function preservation and perplexity.

Perplexity protocol: the text is tokenised once (no BOS added beyond what the tokenizer adds), cut
into disjoint windows of `context` tokens, and every token but the first of each window is scored.
Both models of a comparison see exactly the same windows.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn


def held_out_text() -> tuple[str, str]:
    """Default evaluation text: the source of Python's own `textwrap` module (ships with every Python)."""
    path = Path(textwrap.__file__)
    return path.read_text(), f"python stdlib {path.name}"


def _windows(ids_N: torch.Tensor, context: int):
    """Disjoint windows of `context` tokens, as (1, n) batches; a last window of one token is dropped
    (it has nothing to score)."""
    for start in range(0, ids_N.numel(), context):
        window = ids_N[start:start + context].unsqueeze(0)
        if window.shape[1] >= 2:
            yield window


def _nll(logits: torch.Tensor, window: torch.Tensor) -> float:
    return nn.functional.cross_entropy(logits[0, :-1].float(), window[0, 1:], reduction="sum").item()


@torch.no_grad()
def perplexity(model: nn.Module, ids_N: torch.Tensor, context: int = 512) -> float:
    nll, count = 0.0, 0
    for window in _windows(ids_N, context):
        nll += _nll(model(window).logits, window)
        count += window.shape[1] - 1
    return math.exp(nll / count)


@dataclass
class Preservation:
    tokens: int
    max_abs: float  # max |logits_moe - logits_dense|
    max_rel: float  # max_abs / max |logits_dense|
    top1_agreement: float  # share of positions whose argmax token is the same
    ppl_dense: float
    ppl_moe: float


@torch.no_grad()
def compare(moe: nn.Module, dense: nn.Module, ids_N: torch.Tensor, context: int = 512) -> Preservation:
    """Logit differences and both perplexities, from one forward pass of each model per window."""
    max_abs, ref_max, agree, n = 0.0, 0.0, 0, 0
    nll_moe, nll_dense, scored = 0.0, 0.0, 0
    for window in _windows(ids_N, context):
        a = moe(window).logits.float()
        b = dense(window).logits.float()
        max_abs = max(max_abs, (a - b).abs().max().item())
        ref_max = max(ref_max, b.abs().max().item())
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        n += window.shape[1]
        nll_moe += _nll(a, window)
        nll_dense += _nll(b, window)
        scored += window.shape[1] - 1
    return Preservation(n, max_abs, max_abs / ref_max, agree / n, math.exp(nll_dense / scored),
                        math.exp(nll_moe / scored))


def format_table(rows: list[tuple[str, str]], title: str | None = None) -> str:
    w = max(len(k) for k, _ in rows)
    v = max(len(x) for _, x in rows)
    lines = [f"| {'metric'.ljust(w)} | {'value'.ljust(v)} |", f"|{'-' * (w + 2)}|{'-' * (v + 2)}|"]
    lines += [f"| {k.ljust(w)} | {x.ljust(v)} |" for k, x in rows]
    return ((title + "\n") if title else "") + "\n".join(lines)
