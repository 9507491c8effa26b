"""Tiny random models built in fixtures (no downloads), and helpers shared by the tests."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

torch.set_num_threads(2)

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, head_dim=16)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(model_type: str = "llama", **overrides):
    kw = dict(TINY, **overrides)
    if model_type == "llama":
        kw.setdefault("tie_word_embeddings", True)  # like SmolLM2
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    # Random init uses std 0.02, which makes every MLP nearly zero; larger weights make the tests bite.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative logit difference the project reports everywhere."""
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, TINY["vocab_size"], (2, 24), generator=g)


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny dense Llama saved as a Hugging Face directory (safetensors)."""
    d = tmp_path / "dense"
    tiny_model("llama").save_pretrained(d)
    return d
