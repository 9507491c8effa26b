"""The native format: bit-exact round trips, sharding, tied weights, atomic writes, generation."""

import json

import pytest
import torch

import upcycle.formats.native as native
from conftest import tiny_model
from upcycle import UpcycleError, UpcyclePlan, load, save, upcycle


def test_save_load_round_trip_is_bit_exact(tmp_path, ids):
    plan = UpcyclePlan(num_experts=4, layers="all")
    moe = upcycle(tiny_model("llama"), plan)
    out = save(moe, plan, tmp_path / "moe", max_shard_size=200_000)  # forces several shards
    files = sorted(p.name for p in out.iterdir())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and set(shards) <= set(files)
    assert {"config.json", "upcycle.json"} <= set(files)
    meta = json.loads((out / "upcycle.json").read_text())
    assert meta["plan"]["num_experts"] == 4 and meta["moe_layers"] == [0, 1, 2, 3]
    assert meta["tied_weights"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert set(meta["versions"]) >= {"upcycle", "torch", "transformers", "safetensors"}

    back = load(out)
    a, b = moe.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()  # still tied
    with torch.no_grad():
        assert torch.equal(moe(ids).logits, back(ids).logits)


@pytest.mark.parametrize("family", ["mistral", "qwen3"])
def test_round_trip_other_families(tmp_path, ids, family):
    plan = UpcyclePlan(num_experts=2, top_k=1, normalize=False)
    moe = upcycle(tiny_model(family), plan)
    back = load(save(moe, plan, tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(moe(ids).logits, back(ids).logits)


def test_generate_matches_dense_greedy(tmp_path):
    dense = tiny_model("llama")
    plan = UpcyclePlan(num_experts=4)
    moe = load(save(upcycle(dense, plan), plan, tmp_path / "m"))
    prompt = torch.tensor([[5, 17, 42, 7]])
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(moe.generate(prompt, **kw), dense.generate(prompt, **kw))


def test_existing_output_is_refused_and_overwrite_replaces_it(tmp_path):
    plan = UpcyclePlan(num_experts=2)
    moe = upcycle(tiny_model("llama"), plan)
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UpcycleError, match="already exists"):
        save(moe, plan, out)
    assert (out / "keep.txt").exists()
    save(moe, plan, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "upcycle.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary directories left


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    plan = UpcyclePlan(num_experts=2)
    moe = upcycle(tiny_model("llama"), plan)

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(native, "write_items", crash)
    with pytest.raises(KeyboardInterrupt):
        save(moe, plan, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    save(moe, plan, tmp_path / "m")  # the next run succeeds
    assert (tmp_path / "m" / "upcycle.json").exists()


def test_load_errors(tmp_path):
    with pytest.raises(UpcycleError, match="model directory not found"):
        load(tmp_path / "nope")
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(UpcycleError, match="no upcycle.json"):
        load(tmp_path / "dense")
