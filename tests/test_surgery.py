"""Function preservation of sparse upcycling on tiny random decoders of every supported family."""

import copy

import pytest
import torch
import torch.nn as nn

from conftest import FAMILIES, rel_diff, tiny_model
from upcycle import UpcycleError, UpcyclePlan, upcycle, upcycle_state_dict
from upcycle.errors import PlanError
from upcycle.moe.block import MoEBlock, moe_blocks


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_topk_renormalised_copies_reproduce_dense_logits(family, ids):
    dense = tiny_model(family)
    moe = upcycle(dense, UpcyclePlan(num_experts=4, top_k=2))
    assert [n for n, _ in moe_blocks(moe)] == ["model.layers.1.mlp", "model.layers.3.mlp"]
    ref = logits(dense, ids)
    assert rel_diff(logits(moe, ids), ref) <= 1e-5
    # and the MoE layers did route: the two experts of each token are mixed, not a pass-through
    for _, b in moe_blocks(moe):
        assert b.last_routing.counts_E.sum() == ids.numel() * 2


class ScaledMLP(nn.Module):
    """The dense MLP times the top-k probability mass of the router: what top-k without
    renormalisation computes when every expert is the same MLP."""

    def __init__(self, mlp, router_weight, k):
        super().__init__()
        self.mlp, self.w, self.k = mlp, router_weight, k

    def forward(self, x):
        p = torch.softmax(x.float() @ self.w.float().T, dim=-1)
        return self.mlp(x) * p.topk(self.k, dim=-1).values.sum(-1, keepdim=True).to(x.dtype)


def test_topk_without_renormalisation_scales_the_mlp_by_the_topk_mass(ids):
    dense = tiny_model("llama")
    plan = UpcyclePlan(num_experts=4, top_k=2, normalize=False, router_std=0.5)
    moe = upcycle(dense, plan)
    scaled = copy.deepcopy(dense)
    for i in (1, 3):
        layer = scaled.model.layers[i]
        layer.mlp = ScaledMLP(layer.mlp, moe.model.layers[i].mlp.router.weight, 2)
    out = logits(moe, ids)
    assert rel_diff(out, logits(scaled, ids)) <= 1e-5
    assert rel_diff(out, logits(dense, ids)) > 1e-2  # the scaling really changes the function


def test_expert_choice_is_refused_in_a_decoder():
    # A token's experts would depend on later tokens; encoders get it (tests/test_encoders.py).
    with pytest.raises(PlanError, match="breaks causality.*router: topk"):
        upcycle(tiny_model("llama"), UpcyclePlan(num_experts=4, router="expert_choice"))


def test_soft_router_reproduces_dense(ids):
    dense = tiny_model("qwen2")
    moe = upcycle(dense, UpcyclePlan(num_experts=3, router="soft", layers="all"))
    assert rel_diff(logits(moe, ids), logits(dense, ids)) <= 1e-5


def test_everything_but_the_chosen_mlps_is_untouched():
    dense = tiny_model("llama")
    sd = dense.state_dict()
    plan = UpcyclePlan(num_experts=3, layers=[0, 2])
    out = upcycle_state_dict(sd, plan, dense.config)
    assert set(sd) == set(dense.state_dict())  # the input is not modified
    for k, v in sd.items():
        if ".layers.0.mlp." in k or ".layers.2.mlp." in k:
            assert k not in out
        else:
            assert out[k] is v
    for i in (0, 2):
        for name, proj in (("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "down_proj")):
            w = out[f"model.layers.{i}.mlp.experts.{name}"]
            assert w.shape[0] == 3 and all(
                torch.equal(w[e], sd[f"model.layers.{i}.mlp.{proj}.weight"]) for e in range(3)
            )
        assert out[f"model.layers.{i}.mlp.router.weight"].shape == (3, 64)


def test_router_initialisations():
    dense = tiny_model("llama", hidden_size=256, intermediate_size=64, head_dim=64)
    for init, std in (("normal", 0.02), ("uniform", 0.05)):
        moe = upcycle(dense, UpcyclePlan(num_experts=16, router_init=init, router_std=std, seed=3))
        w = moe.model.layers[1].mlp.router.weight
        assert abs(w.std().item() - std) < 0.1 * std and abs(w.mean().item()) < 0.1 * std
        if init == "uniform":
            assert w.abs().max().item() <= std * 3**0.5
        w2 = upcycle(dense, UpcyclePlan(num_experts=16, router_init=init, router_std=std, seed=3))
        assert torch.equal(w, w2.model.layers[1].mlp.router.weight)  # seeded
        assert not torch.equal(w, moe.model.layers[3].mlp.router.weight)  # layers differ
    moe = upcycle(dense, UpcyclePlan(router_init="zeros"))
    assert moe.model.layers[1].mlp.router.weight.abs().max() == 0


def test_noise_init_perturbs_each_expert_independently():
    dense = tiny_model("llama", intermediate_size=256)
    moe = upcycle(dense, UpcyclePlan(num_experts=4, expert_init="noise", noise_std=0.01))
    w = moe.model.layers[1].mlp.experts.up_proj
    base = dense.model.layers[1].mlp.up_proj.weight
    diff = w - base
    assert abs(diff.std().item() - 0.01) < 0.001
    assert not torch.equal(w[0], w[1])


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UpcycleError, match="model_type 'gpt2' is not supported yet; supported: llama"):
        upcycle(model, UpcyclePlan())


def test_upcycle_copies_unless_inplace():
    dense = tiny_model("llama")
    upcycle(dense, UpcyclePlan())
    assert not moe_blocks(dense)
    same = upcycle(dense, UpcyclePlan(), inplace=True)
    assert same is dense and isinstance(dense.model.layers[1].mlp, MoEBlock)
