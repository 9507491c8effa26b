"""`upcycle experiment` end to end at the tiny size: every arm gives a finite validation loss at every
budget, the upcycled model starts exactly where the dense checkpoint is (function preservation), every
arm spends the extra FLOPs it was given, the continued arms read text the pretraining did not, the
outputs are written and a second run resumes from them without training again."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import pytest
import torch

from upcycle.cli import main
from upcycle.data.tokens import Batches, PackedData
from upcycle.errors import UpcycleError
from upcycle.experiments.common import budget_steps, split_seen
from upcycle.experiments.recipe import ARMS, Recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment") / "tiny"
    t0 = time.perf_counter()
    assert main(["experiment", str(RECIPES / "tiny.yaml"), "--out", str(out), "--quiet"]) == 0
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    return out, rows, json.loads((out / "results.json").read_text()), time.perf_counter() - t0


def test_every_arm_has_a_finite_loss_at_every_budget(tiny_run):
    out, rows, info, _ = tiny_run
    recipe = Recipe.from_yaml(RECIPES / "tiny.yaml")
    assert set(recipe.arms) == set(ARMS)
    for arm in ARMS:
        got = {float(r["target_extra"]): float(r["val_loss"]) for r in rows if r["arm"] == arm}
        assert set(got) == {0.0, *recipe.extra}, arm
        assert all(math.isfinite(v) and 0 < v < math.log(recipe.tokenizer["vocab_size"]) + 1 for v in got.values())
    # the dense model learns from its extra compute (a broken loop would leave it where it started)
    dense = {float(r["target_extra"]): float(r["val_loss"]) for r in rows if r["arm"] == "dense"}
    assert dense[0.4] < dense[0.0] - 0.05


def test_upcycled_starts_at_the_dense_checkpoint(tiny_run):
    _, rows, info, _ = tiny_run
    start = {r["arm"]: float(r["val_loss"]) for r in rows if float(r["target_extra"]) == 0}
    ref = info["dense_val_loss"]
    assert abs(start["upcycled"] - ref) <= 1e-4 * ref  # copies + renormalised top-2: the same function
    assert start["upcycled_carry"] == start["upcycled"]
    after = {r["arm"]: float(r["val_loss"]) for r in rows if float(r["target_extra"]) == 0.1}
    assert after["upcycled_carry"] != after["upcycled"]  # the carried AdamW state changes the updates
    assert abs(start["dense"] - ref) <= 1e-6 * ref
    assert abs(start["depth_tiled"] - ref) > 1e-3  # stacking layers is not function preserving
    # and the dense checkpoint's loss is what its own pretraining run measured at its last step
    with open(Path(tiny_run[0]) / "pretrain" / "metrics.csv") as fh:
        last = list(csv.DictReader(fh))[-1]
    assert abs(float(last["val_loss"]) - ref) <= 1e-5 * ref


def test_every_arm_spends_the_extra_flops_it_was_given(tiny_run):
    _, rows, info, _ = tiny_run
    B = info["B_flops"]
    assert B == pytest.approx(info["dense_flops_per_token"] * info["pretrain_tokens"])
    for r in rows:
        t = float(r["target_extra"])
        if t == 0 and r["arm"] != "moe_scratch":
            assert float(r["extra_flops"]) == 0
            continue
        # one counter for all: FLOPs = FLOPs/token x tokens, and the extra within 5% of the target
        assert float(r["flops"]) == pytest.approx(int(r["flops_per_token"]) * int(r["tokens"]), rel=1e-9)
        got = float(r["extra_flops"]) / B
        assert abs(got - t) <= 0.05 * max(t, 0.1), (r["arm"], t, got)
    fpt = {r["arm"]: int(r["flops_per_token"]) for r in rows}
    assert fpt["dense"] < fpt["upcycled"] == fpt["upcycled_carry"] == fpt["moe_scratch"] < fpt["depth_tiled"]
    # moe_scratch gets the whole budget B before its 0% point
    s0 = next(r for r in rows if r["arm"] == "moe_scratch" and float(r["target_extra"]) == 0)
    assert float(s0["flops"]) == pytest.approx(B, rel=0.05)


def test_outputs_and_resume(tiny_run):
    out, rows, info, seconds = tiny_run
    for f in (
        "results.csv",
        "results.md",
        "results.json",
        "loss_vs_flops.png",
        "tokenizer/tokenizer.json",
        "pretrain/metrics.csv",
        "pretrain/model/config.json",
    ):
        assert (out / f).is_file(), f
    assert (out / "loss_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for arm in ARMS:
        assert (out / arm / "metrics.csv").is_file()
        assert not (out / arm / "checkpoints").exists() or not any((out / arm / "checkpoints").iterdir())
    md = (out / "results.md").read_text()
    assert "sparse upcycled" in md and info["machine"]["cpu"] in md and "torch" in md
    # a second run finds every run finished: same numbers, no training
    t0 = time.perf_counter()
    assert main(["experiment", str(RECIPES / "tiny.yaml"), "--out", str(out), "--quiet"]) == 0
    assert time.perf_counter() - t0 < seconds
    with open(out / "results.csv") as fh:
        again = list(csv.DictReader(fh))
    assert [(r["arm"], r["step"], r["val_loss"]) for r in again] == [(r["arm"], r["step"], r["val_loss"]) for r in rows]
    assert seconds < 90


def test_continued_arms_read_unseen_text():
    recipe = Recipe.from_yaml(RECIPES / "tiny.yaml")
    train = torch.arange(200 * 4).view(200, 4)
    data = PackedData(train, train[:2])
    cont = split_seen(data, recipe, pretrain_steps=10)
    seen = Batches(train, recipe.batch_size, recipe.seed).next_step(10)
    seen_rows = {int(x) for t in seen for x in t[:, 0]}
    cont_rows = {int(x) for x in cont.train[:, 0]}
    assert len(seen_rows) == 10 * recipe.batch_size
    assert not seen_rows & cont_rows and len(seen_rows | cont_rows) == 200


def test_budget_steps():
    every, steps = budget_steps([0.1, 0.2, 0.4], 1000.0, 10, 1)
    assert every == 10 and steps == {0.1: 10, 0.2: 20, 0.4: 40}
    every, steps = budget_steps([1.0, 1.1, 1.2, 1.4], 1000.0, 7, 1)
    assert every == 14 and steps == {1.0: 143, 1.1: 157, 1.2: 171, 1.4: 200}


def test_recipes_parse_and_bad_recipes_fail(tmp_path):
    small = Recipe.from_yaml(RECIPES / "paper-small.yaml")
    tiny_of_small = Recipe.from_yaml(RECIPES / "paper-small.yaml", tiny=True)
    tiny = Recipe.from_yaml(RECIPES / "tiny.yaml")
    assert small.model["hidden_size"] > tiny.model["hidden_size"]
    assert tiny_of_small.model == tiny.model and tiny_of_small.pretrain_tokens == tiny.pretrain_tokens
    assert small.plan_obj.num_experts == 8 and small.plan_obj.top_k == 2
    smol = Recipe.from_yaml(RECIPES / "smollm2.yaml")
    assert smol.pretrained and set(smol.arms) == {"dense", "upcycled"}
    with pytest.raises(UpcycleError, match="optimizer state"):
        Recipe.from_dict(
            {"model": "smollm2", "reference_tokens": 100, "tokenizer": "model", "arms": ["upcycled_carry"]}
        )
    for bad, msg in [
        ({"modle": {}}, "unknown key 'modle'"),
        ({"arms": ["dense", "sparse"]}, "unknown arm 'sparse'"),
        ({"extra": [0]}, "extra"),
        ({"model": "gpt5"}, "pretrained model"),
    ]:
        d = {"model": tiny.model, "pretrain_tokens": 10_000, **bad}
        with pytest.raises(UpcycleError, match=msg):
            Recipe.from_dict(d)
    with pytest.raises(UpcycleError, match="tiny"):
        Recipe.from_dict({"model": tiny.model, "pretrain_tokens": 10_000}, tiny=True)
    assert main(["experiment", str(tmp_path / "missing.yaml")]) == 2


def test_an_arm_does_not_depend_on_the_arms_before_it(tiny_run, tmp_path):
    """upcycled_carry alone (on the same pretraining) gives the numbers it gave after the dense arm had
    trained from the same dense AdamW state in the same process."""
    import shutil

    from upcycle.experiments.sparse import run_experiment

    out, rows, _, _ = tiny_run
    alone = tmp_path / "alone"
    alone.mkdir()
    for d in ("pretrain", "tokenizer"):
        shutil.copytree(out / d, alone / d)
    recipe = Recipe.from_yaml(RECIPES / "tiny.yaml")
    import dataclasses

    res = run_experiment(
        dataclasses.replace(recipe, arms=("upcycled_carry",)), alone, progress=False, log=lambda m: None
    )
    want = [(r["step"], float(r["val_loss"])) for r in rows if r["arm"] == "upcycled_carry"]
    got = [(str(r["step"]), r["val_loss"]) for r in res["rows"]]
    assert got == want
