"""Tiny random models built in fixtures (no downloads), and helpers shared by the tests."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

torch.set_num_threads(2)

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
    head_dim=16,
)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo2")


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


def with_router(model, kind: str, **kw):
    """Give every MoE block of `model` another router (moe.RouterConfig fields): for tests of routing
    mechanics on tiny decoders, where a plan would refuse expert choice (it breaks causality)."""
    from upcycle.moe.block import RouterConfig, moe_blocks

    for _, b in moe_blocks(model):
        b.router_config = RouterConfig(kind, **kw)
    return model


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


WORDS = (
    "the a of to and in is it that for on with as was by he she they at be this from or have an "
    "not are but had his her which one were all we when there can been has more if no out so said "
    "what up its about into than them only other new some could time these two may then do first "
    "any my now such like our over man me even most made after also did many before must through "
    "back years where much your way well down should because each just those people how too little "
    "state good very make world still own see men work long get here between both life being under "
    "never day same another know while last might us great old year off come since against go came"
).split()


def save_tiny_tokenizer(directory):
    """A word-level tokenizer whose vocabulary fits the tiny models (128 ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS[:127])}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(directory)


@pytest.fixture
def tiny_dir_tok(tiny_dir):
    save_tiny_tokenizer(tiny_dir)
    return tiny_dir


@pytest.fixture
def text_file(tmp_path):
    import random

    rng = random.Random(0)
    f = tmp_path / "text.txt"
    f.write_text(" ".join(rng.choice(WORDS[:127]) for _ in range(300)))
    return f
