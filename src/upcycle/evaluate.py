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


@torch.no_grad()
def perplexity(model: nn.Module, ids_N: torch.Tensor, context: int = 512) -> float:
    nll, count = 0.0, 0
    for start in range(0, ids_N.numel(), context):
        window = ids_N[start:start + context].unsqueeze(0)
        if window.shape[1] < 2:
            break
        logits = model(window).logits.float()
        loss = nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        nll += loss.item()
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
    max_abs, ref_max, agree, n = 0.0, 0.0, 0, 0
    for start in range(0, ids_N.numel(), context):
        window = ids_N[start:start + context].unsqueeze(0)
        a = moe(window).logits.float()
        b = dense(window).logits.float()
        max_abs = max(max_abs, (a - b).abs().max().item())
        ref_max = max(ref_max, b.abs().max().item())
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        n += window.shape[1]
    return Preservation(n, max_abs, max_abs / ref_max, agree / n, perplexity(dense, ids_N, context),
                        perplexity(moe, ids_N, context))


def format_table(rows: list[tuple[str, str]], title: str | None = None) -> str:
    w = max(len(k) for k, _ in rows)
    v = max(len(x) for _, x in rows)
    lines = [f"| {'metric'.ljust(w)} | {'value'.ljust(v)} |", f"|{'-' * (w + 2)}|{'-' * (v + 2)}|"]
    lines += [f"| {k.ljust(w)} | {x.ljust(v)} |" for k, x in rows]
    return ((title + "\n") if title else "") + "\n".join(lines)
