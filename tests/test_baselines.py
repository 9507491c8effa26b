"""Baseline builders: depth tiling (a deeper dense model warm-started by repeating layers) and an MoE of the
upcycled shape trained from scratch."""

import pytest
import torch

from conftest import TINY, tiny_config, tiny_model
from upcycle import UpcycleError, UpcyclePlan, upcycle
from upcycle.methods.baselines import moe_from_scratch, num_params
from upcycle.methods.tiling import depth_tile, tile_order
from upcycle.moe.block import moe_blocks
from upcycle.train.flops import active_params, flops_per_token


def test_tile_order():
    assert tile_order(3, 6, "stack") == [0, 1, 2, 0, 1, 2]
    assert tile_order(3, 6, "interleave") == [0, 0, 1, 1, 2, 2]
    assert tile_order(4, 6, "stack") == [0, 1, 2, 3, 0, 1]
    assert tile_order(4, 6, "interleave") == [0, 0, 1, 2, 2, 3]
    with pytest.raises(UpcycleError, match="deeper"):
        tile_order(4, 3)
    with pytest.raises(UpcycleError, match="mode"):
        tile_order(4, 8, "shuffle")


@pytest.mark.parametrize("family,mode", [("llama", "stack"), ("llama", "interleave"), ("qwen2", "stack")])
def test_depth_tile_shape_weights_and_cache(family, mode):
    dense = tiny_model(family)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    deep = depth_tile(dense, factor=2, mode=mode)
    L = TINY["num_hidden_layers"]
    layers = deep.model.layers
    assert deep.config.num_hidden_layers == len(layers) == 2 * L
    per_layer = sum(p.numel() for p in dense.model.layers[0].parameters())
    assert num_params(deep) == num_params(dense) + L * per_layer
    src = tile_order(L, 2 * L, mode)
    for j, s in enumerate(src):
        assert layers[j].self_attn.layer_idx == j
        for (n, a), (_, b) in zip(layers[j].named_parameters(), dense.model.layers[s].named_parameters()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), n  # a copy, not shared
    assert torch.equal(deep.lm_head.weight, dense.lm_head.weight)
    if dense.config.tie_word_embeddings:
        assert deep.lm_head.weight is deep.model.embed_tokens.weight
    for k, v in dense.state_dict().items():  # the source is untouched
        assert torch.equal(v, before[k])

    # KV cache: each layer its own slot, so incremental decoding matches a full forward pass.
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, TINY["vocab_size"], (1, 12), generator=g)
    with torch.no_grad():
        full = deep(ids, use_cache=False).logits
        out = deep(ids[:, :-1], use_cache=True)
        assert out.past_key_values.get_seq_length() == 11
        step = deep(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits
    assert torch.allclose(step[0, -1], full[0, -1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full, dense(ids).logits, atol=1e-3)  # deeper != the same function
    gen = deep.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 9)


def test_depth_tile_num_layers_and_errors():
    dense = tiny_model("llama")
    deep = depth_tile(dense, num_layers=6)
    assert deep.config.num_hidden_layers == 6 and deep.config.depth_tiling["source_of_layer"] == [0, 1, 2, 3, 0, 1]
    with pytest.raises(UpcycleError, match="exactly one"):
        depth_tile(dense)
    with pytest.raises(UpcycleError, match="deeper"):
        depth_tile(dense, num_layers=2)
    moe = upcycle(dense, UpcyclePlan(num_experts=2))
    with pytest.raises(UpcycleError, match="dense models"):
        depth_tile(moe, factor=2)


@pytest.mark.parametrize(
    "plan",
    [
        UpcyclePlan(num_experts=4),
        UpcyclePlan(num_experts=4, layers="all", top_k=1),
        UpcyclePlan(num_experts=2, router="soft", router_init="zeros"),
    ],
)
def test_moe_from_scratch_has_the_upcycled_shape(plan):
    config = tiny_config("llama")
    dense = tiny_model("llama")
    up = upcycle(dense, plan)
    scratch = moe_from_scratch(config, plan, seed=1)
    a, b = up.state_dict(), scratch.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    assert num_params(scratch) == num_params(up)
    assert flops_per_token(scratch, 64) == flops_per_token(up, 64)
    assert [n for n, _ in moe_blocks(scratch)] == [n for n, _ in moe_blocks(up)]

    std = config.initializer_range
    for _, block in moe_blocks(scratch):
        w = block.experts.up_proj
        assert abs(w.std().item() - std) < 0.1 * std and abs(w.mean().item()) < 0.1 * std
        assert not torch.equal(w[0], w[1])  # independent experts, not copies
        r = block.router.weight
        if plan.router_init == "zeros":
            assert torch.count_nonzero(r) == 0
        else:
            assert abs(r.std().item() - plan.router_std) < 0.15 * plan.router_std
    emb = scratch.model.embed_tokens.weight
    assert abs(emb.std().item() - std) < 0.1 * std  # HF init elsewhere
    assert torch.equal(scratch.model.norm.weight, torch.ones_like(scratch.model.norm.weight))
    with torch.no_grad():
        out = scratch(torch.arange(10).unsqueeze(0)).logits
    assert out.shape == (1, 10, TINY["vocab_size"]) and torch.isfinite(out).all()


def test_moe_from_scratch_is_reproducible_and_leaves_the_rng_alone():
    config, plan = tiny_config("llama"), UpcyclePlan(num_experts=2)
    torch.manual_seed(123)
    a = moe_from_scratch(config, plan, seed=5)
    after = torch.rand(1)
    torch.manual_seed(123)
    b = moe_from_scratch(config, plan, seed=5)
    assert torch.equal(torch.rand(1), after)
    c = moe_from_scratch(config, plan, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.1.mlp.experts.up_proj"], sc["model.layers.1.mlp.experts.up_proj"])


def test_moe_from_scratch_rejects_an_upcycled_config():
    up = upcycle(tiny_model("llama"), UpcyclePlan(num_experts=2))
    with pytest.raises(UpcycleError, match="dense model's config"):
        moe_from_scratch(up.config, UpcyclePlan(num_experts=2))


def test_flops_per_token_counts_active_experts():
    dense = tiny_model("llama")  # tied head: the embedding matrix counts once, as the head
    D, Fd, V, L, ctx = TINY["hidden_size"], TINY["intermediate_size"], TINY["vocab_size"], 4, 64
    attn_width = TINY["num_attention_heads"] * TINY["head_dim"]
    assert flops_per_token(dense, ctx) == 6 * num_params(dense) + 12 * L * ctx * attn_width
    untied = tiny_model("llama", tie_word_embeddings=False)
    assert flops_per_token(untied, ctx) == flops_per_token(dense, ctx)  # the lookup is free
    up = upcycle(dense, UpcyclePlan(num_experts=4, top_k=2))  # layers 1, 3: 2 of 4 experts active, plus routers
    mlp = 3 * D * Fd
    assert flops_per_token(up, ctx) - flops_per_token(dense, ctx) == 6 * 2 * (mlp + 4 * D)
    assert flops_per_token(depth_tile(dense, factor=2), ctx) == pytest.approx(
        flops_per_token(dense, ctx)
        + 6 * L * sum(p.numel() for p in dense.model.layers[0].parameters())
        + 12 * L * ctx * attn_width
    )
    assert V * D == dense.lm_head.weight.numel()


def test_active_params_with_the_embedding_as_upcycle_sparse_prints():
    """Model cards' 'active parameters' count the input embedding: a lookup, so not in the FLOPs count."""
    plan = UpcyclePlan(num_experts=4, top_k=2)
    tied = upcycle(tiny_model("llama"), plan)
    assert active_params(tied, embedding=True) == active_params(tied)  # counted once, as the head
    untied = upcycle(tiny_model("llama", tie_word_embeddings=False), plan)
    V, D, mlp = TINY["vocab_size"], TINY["hidden_size"], 3 * TINY["hidden_size"] * TINY["intermediate_size"]
    assert active_params(untied, embedding=True) == active_params(untied) + V * D
    assert active_params(untied, embedding=True) == num_params(untied) - 2 * (4 - 2) * mlp  # 2 of 4 experts idle
