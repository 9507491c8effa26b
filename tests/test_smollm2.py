"""Function preservation on the real SmolLM2-135M-Instruct (the embedded default model).

The model is built once from its PyPI wheel and cached (UPCYCLE_CACHE, default ~/.cache/upcycle);
CI runs these tests too."""

import copy

import pytest
import torch

from conftest import rel_diff
from test_surgery import ScaledMLP
from upcycle import UpcycleError, UpcyclePlan, load, save, upcycle
from upcycle.eval.perplexity import held_out_text, perplexity

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.hub import default_model_dir

    d = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok(held_out_text()[0], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        ref = model(ids).logits
    return model, tok, ids, ref


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_default_plan_reproduces_dense_logits_and_generation(smol):
    dense, tok, ids, ref = smol
    moe = upcycle(dense, UpcyclePlan())  # 8 experts, top-2 renormalised, layers 1, 3, ..., 29
    assert len([m for m in moe.modules() if type(m).__name__ == "MoEBlock"]) == 15
    assert rel_diff(logits(moe, ids), ref) <= 1e-5
    assert perplexity(moe, ids[0], 128) == pytest.approx(perplexity(dense, ids[0], 128), rel=1e-5)
    prompt = tok("The capital of France is", return_tensors="pt")
    out = moe.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0])


def test_no_renormalisation_scales_each_mlp_by_its_topk_mass(smol):
    dense, _, ids, ref = smol
    moe = upcycle(dense, UpcyclePlan(normalize=False))
    scaled = copy.deepcopy(dense)
    for i in range(1, 30, 2):
        scaled.model.layers[i].mlp = ScaledMLP(scaled.model.layers[i].mlp, moe.model.layers[i].mlp.router.weight, 2)
    out = logits(moe, ids)
    assert rel_diff(out, logits(scaled, ids)) <= 1e-5
    assert rel_diff(out, ref) > 1e-2


def test_expert_choice_is_refused_in_the_real_decoder(smol):
    with pytest.raises(UpcycleError, match="breaks causality"):
        upcycle(smol[0], UpcyclePlan(router="expert_choice", capacity_factor=8.0))


def test_save_load_round_trip_is_bit_exact(smol, tmp_path):
    dense, _, ids, _ = smol
    plan = UpcyclePlan(num_experts=4, layers="last_n:6")
    moe = upcycle(dense, plan)
    back = load(save(moe, plan, tmp_path / "moe"))
    a, b = moe.state_dict(), back.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(logits(moe, ids), logits(back, ids))


@pytest.mark.parametrize(
    "target,plan",
    [
        ("qwen2_moe", UpcyclePlan()),  # the default plan: interleaved, 8 experts, top-2 renormalised
        ("mixtral", UpcyclePlan(num_experts=2, layers="all")),  # Mixtral needs every layer MoE (2 experts: CI-sized)
    ],
)
def test_stock_export_of_smollm2_matches_ours_and_dense(smol, tmp_path, target, plan):
    from transformers import AutoModelForCausalLM

    from upcycle.formats.stock import export

    dense, tok, ids, ref = smol
    moe = upcycle(dense, plan)
    export(moe, target, tmp_path / target)
    stock, info = AutoModelForCausalLM.from_pretrained(tmp_path / target, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    out = logits(stock.eval(), ids)
    assert rel_diff(out, logits(moe, ids)) <= 1e-5
    assert rel_diff(out, ref) <= 1e-5
    prompt = tok("The capital of France is", return_tensors="pt")
    assert "Paris" in tok.decode(stock.generate(**prompt, max_new_tokens=4, do_sample=False)[0])
