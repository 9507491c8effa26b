"""The regime study's mechanics at its smoke size (`recipes/upcycling-regime.yaml --tiny`): every arm
branches from the same checkpoint bytes, every continued arm follows the same LR path (re-warm, stable,
decay over the last 20% of each budget) step by step, each budget point spends its target FLOPs to
within 1%, a decay branch is exactly the run of its budget, the seeds really differ, and a second call
trains nothing."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import pytest

from upcycle.cli import main
from upcycle.errors import UpcycleError
from upcycle.experiments.regime_recipe import Job, RegimeRecipe, job_dir, load_recipe_mapping, plan_jobs, sha256_file
from upcycle.experiments.regime_report import collect
from upcycle.train.config import TrainConfig

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "upcycling-regime.yaml"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("regime") / "tiny"
    assert main(["experiment", str(RECIPE), "--tiny", "--out", str(out), "--quiet"]) == 0
    r = RegimeRecipe.from_dict(load_recipe_mapping(RECIPE), tiny=True)
    return r, out, json.loads((out / "results.json").read_text())


def _results(r, out):
    return {j: json.loads((job_dir(out, j) / "result.json").read_text()) for j in plan_jobs(r) if j.arm}


def _lrs(path: Path) -> list[float]:
    with open(path) as fh:
        return [float(row["lr"]) for row in csv.DictReader(fh)]


def test_the_real_recipe_is_valid_and_sized_as_documented():
    r = RegimeRecipe.from_dict(load_recipe_mapping(RECIPE))
    assert r.main["tokens_per_param"] >= 80 and r.extra == (0.25, 0.5, 1.0)
    need = {
        "dense",
        "upcycled",
        "upcycled_unnormalized",
        "upcycled_top1",
        "granular",
        "drop",
        "moe_scratch",
        "dense_wide_scratch",
    }
    assert need <= set(r.arms) and r.seeds("dense") >= 3 and r.seeds("upcycled") >= 3
    assert r.arm_plan("drop").drop_ratio == 0.5 and r.arm_plan("upcycled").top_k == 2
    assert len(r.sizes) >= 2 and r.map_seeds >= 3


def test_every_run_finished_with_a_finite_loss(study):
    r, out, res = study
    assert res["missing_runs"] == []
    assert set(res["arms"]) == set(r.arms)
    for a in res["arms"].values():
        assert all(math.isfinite(p["val_loss_mean"]) for p in a["points"])
    d = res["arms"]["dense"]["points"]
    assert d[-1]["val_loss_mean"] < res["dense"]["val_loss"] - 0.02  # continued training learns
    assert {"main_budgets.png", "main_curves.png", "map_heatmap.png"} <= set(res["figures"])
    assert (out / "results.csv").is_file() and "## Crossover map" in (out / "results.md").read_text()


def test_every_arm_branches_from_the_same_checkpoint_bytes(study):
    r, out, res = study
    for j, x in _results(r, out).items():
        branch = out / j.size / "pretrain" / f"branch-{j.tpp:g}" / "model.safetensors"
        assert x["branch_sha256"] == sha256_file(branch), j.name
    runs = _results(r, out)
    main_ = {j.arm: x for j, x in runs.items() if (j.size, j.tpp) == ("main", 20.0) and j.seed == 0}
    dense = main_["dense"]["start_val_loss"]
    assert dense == pytest.approx(res["dense"]["val_loss"], rel=1e-6)
    for arm in ("upcycled", "upcycled_carry"):  # copies + renormalised top-2 start as the dense model
        assert main_[arm]["start_val_loss"] == pytest.approx(dense, rel=1e-5), arm
    assert main_["drop"]["start_val_loss"] != pytest.approx(dense, rel=1e-3)  # re-drawn neurons move it
    assert abs(main_["moe_scratch"]["start_val_loss"] - dense) > 1.0  # a random init is far away


def test_every_continued_arm_follows_the_same_lr_path(study):
    r, out, _ = study
    paths = {}
    for j, x in _results(r, out).items():
        if x["kind"] not in ("dense", "upcycled"):
            continue
        d = job_dir(out, j)
        B, fpt, tps = x["B_flops"], x["flops_per_token"], r.batch_size * r.seq_len
        for k, p in enumerate(x["points"]):
            lrs = _lrs(d / ("stable" if k == len(x["points"]) - 1 else f"branch-{p['extra']:g}") / "metrics.csv")
            assert len(lrs) == p["steps"]  # one row a step, from the arm's first step (a branch keeps the stable rows)
            warm, start = x["warmup_steps"], p["steps"] - max(1, round(r.decay_fraction * p["steps"]))
            # the same path in FLOPs: re-warm over rewarm x B, decay over the last 20% of the budget
            assert abs(warm * fpt * tps - r.rewarm * B) <= fpt * tps
            assert abs(start * fpt * tps - (1 - r.decay_fraction) * p["target_flops"]) <= 2 * fpt * tps
            assert lrs[warm - 1] == pytest.approx(r.lr) and lrs[0] == pytest.approx(r.lr / warm)
            assert all(v == pytest.approx(r.lr) for v in lrs[warm:start])
            assert lrs[-1] == pytest.approx(r.lr * r.final_lr_ratio)
            assert all(a >= b for a, b in zip(lrs[start - 1 :], lrs[start:]))
            paths.setdefault((j.size, j.tpp, p["extra"], x["flops_per_token"]), []).append(lrs)
    for group in paths.values():  # arms and seeds with one FLOPs per token: identical step by step
        assert all(g == group[0] for g in group)
    assert any(len(g) > 1 for g in paths.values())


def test_each_budget_spends_its_target_flops(study):
    r, out, res = study
    for j, x in _results(r, out).items():
        if (j.size, j.tpp) != ("main", 20.0):
            continue
        for p in x["points"]:
            assert abs(p["flops"] - p["target_flops"]) <= 0.01 * p["target_flops"], (j.name, p)
            if x["kind"] in ("dense", "upcycled"):
                assert p["extra_flops"] == p["flops"]
    # the positive control reads exactly the dense arm's tokens (its pretraining's and its continuation's)
    dense, wide = res["arms"]["dense"]["points"], res["arms"]["dense_wide_scratch"]["points"]
    for a, b in zip(dense, wide):
        assert b["tokens"] == a["tokens"] + res["dense"]["tokens"]


def test_a_scratch_arm_with_decay_extra_decays_over_the_continued_arms_flops(study):
    r, out, _ = study
    runs = _results(r, out)
    short, dense = runs[Job("main", 20.0, "moe_scratch_short_decay", 0)], runs[Job("main", 20.0, "dense", 0)]
    long_ = runs[Job("main", 20.0, "moe_scratch", 0)]
    tps = r.batch_size * r.seq_len
    for k, (p, q) in enumerate(zip(short["points"], dense["points"])):
        name = "stable" if k == len(short["points"]) - 1 else f"branch-{p['extra']:g}"
        lrs = _lrs(job_dir(out, Job("main", 20.0, "moe_scratch_short_decay", 0)) / name / "metrics.csv")
        decay_steps = sum(1 for v in lrs[short["warmup_steps"] :] if v < r.lr)
        dense_decay = max(1, round(r.decay_fraction * q["steps"]))  # the dense arm's decay, in FLOPs
        assert abs(decay_steps * short["flops_per_token"] - dense_decay * dense["flops_per_token"]) * tps <= (
            0.02 * dense_decay * dense["flops_per_token"] * tps + 2 * short["flops_per_token"] * tps
        )
    assert short["points"][-1]["val_loss"] != long_["points"][-1]["val_loss"]


def test_the_seeds_differ(study):
    r, out, _ = study
    runs = _results(r, out)
    for arm in ("dense", "upcycled"):
        a, b = (runs[Job("main", 20.0, arm, s)] for s in (0, 1))
        assert a["points"][-1]["val_loss"] != b["points"][-1]["val_loss"], arm
        assert a["curve"]["val_loss"][1] != b["curve"]["val_loss"][1], arm


def test_a_decay_branch_is_exactly_the_run_of_its_budget(study, tmp_path):
    """The 25% budget's point (stable run to its decay start, then the branch) against one run of that
    budget from the branch point, no stop: the same losses, bit for bit."""
    import torch

    from upcycle.experiments.regime_runs import arm_data, build_arm, load_data, size_config, train_config
    from upcycle.train.loop import train

    r, out, _ = study
    j = Job("main", 20.0, "upcycled", 0)
    x = json.loads((job_dir(out, j) / "result.json").read_text())
    p = x["points"][0]
    data = load_data(out)
    branch = out / "main" / "pretrain" / "branch-20"
    binfo = json.loads((branch / "branch.json").read_text())
    torch.set_num_threads(1)
    model, _ = build_arm(r, "upcycled", 0, size_config(r, "main", data.info), branch)
    arm_d = arm_data(r, data, binfo["steps"], 0, None)
    every = max(1, round(r.eval_every * x["B_flops"] / (x["flops_per_token"] * r.batch_size * r.seq_len)))
    cfg = train_config(r, p["steps"], x["warmup_steps"], 0, every, 10**6)
    rows = train(model, arm_d, cfg, tmp_path / "direct", progress=False, save_model=False)
    assert rows[-1]["val_loss"] == p["val_loss"]


def test_a_second_call_trains_nothing(study):
    r, out, res = study
    t0 = time.perf_counter()
    assert main(["experiment", str(RECIPE), "--tiny", "--out", str(out), "--quiet"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["arms"] == res["arms"] and again["map"] == res["map"]
    assert time.perf_counter() - t0 < 60


def test_a_resume_with_another_recipe_is_refused_by_key(study, tmp_path, capsys):
    """The recorded recipe guards OUT: a changed lr is refused by name before anything runs; a free key
    (workers) is not; a key the old record lacks stands at its default."""
    from upcycle.experiments.common import keep_recipe
    from upcycle.io.yamlio import dump, read_mapping

    r, out, res = study
    changed = read_mapping(RECIPE, "recipe")
    changed["lr"] = 0.001
    (tmp_path / "changed.yaml").write_text(dump(changed))
    assert main(["experiment", str(tmp_path / "changed.yaml"), "--tiny", "--out", str(out), "--quiet"]) == 2
    assert "holds a study with a different recipe (lr)" in capsys.readouterr().err
    keep_recipe(tmp_path, r, free=("workers",))
    keep_recipe(tmp_path, dataclasses.replace(r, workers=r.workers + 1), free=("workers",))
    keep_recipe(tmp_path, r, free=("workers",))
    saved = json.loads((tmp_path / "recipe.json").read_text())
    del saved["final_lr_ratio"]  # a record from before the key existed: its default stands for it
    (tmp_path / "recipe.json").write_text(json.dumps(saved))
    assert r.final_lr_ratio == 0.1  # the field's default
    keep_recipe(tmp_path, r, free=())
    with pytest.raises(UpcycleError, match=r"different recipe \(seq_len\)"):
        keep_recipe(tmp_path, dataclasses.replace(r, seq_len=r.seq_len * 2), free=())


def test_the_saved_state_resumes_on_a_fresh_machine(study, tmp_path):
    """save_state keeps the branch points and the finished runs, not the sequences: a study restored
    from it rebuilds its data (checked against the corpus fingerprint), trains nothing and reports the same."""
    from upcycle.experiments.regime_recipe import save_state

    r, out, res = study
    kept = save_state(out, tmp_path / "kept")
    assert not any(k.endswith("sequences.pt") or "/stable/" in k for k in kept)
    assert main(["experiment", str(RECIPE), "--tiny", "--out", str(out), "--publish", str(tmp_path / "pub")]) == 0
    published = json.loads((tmp_path / "pub" / "results.json").read_text())
    assert published["arms"] == res["arms"] and (tmp_path / "pub" / "main_budgets.png").is_file()
    shutil.move(tmp_path / "pub" / "state", tmp_path / "state")
    assert main(["experiment", str(RECIPE), "--tiny", "--out", str(tmp_path / "state"), "--quiet"]) == 0
    again = json.loads((tmp_path / "state" / "results.json").read_text())
    assert again["arms"] == res["arms"] and again["map"] == res["map"] and again["missing_runs"] == []
    # a different corpus under the same study is refused
    info = json.loads((tmp_path / "state" / "data" / "data.json").read_text())
    info["fingerprint"]["sha256"] = "0" * 64
    (tmp_path / "state" / "data" / "data.json").write_text(json.dumps(info))
    (tmp_path / "state" / "data" / "sequences.pt").unlink()
    assert main(["experiment", str(RECIPE), "--tiny", "--out", str(tmp_path / "state"), "--quiet"]) == 2


def test_the_report_names_the_machines_the_runs_ran_on(study):
    """Each run keeps its CPU; the Machine line comes from the runs, not from wherever the report is made."""
    from upcycle.experiments.common import machine
    from upcycle.experiments.regime_text import _machines

    r, out, res = study
    cpu = machine()["cpu"]
    n = sum(len(v) for v in collect(r, out)["runs"].values())
    assert res["run_machines"] == {cpu: n} and n >= len([j for j in plan_jobs(r) if j.arm])
    assert f"Machine: {cpu}, " in (out / "results.md").read_text()
    here = {"machine": {"cpu": "CPU B"}}
    assert _machines({**here, "run_machines": {"CPU A": 3}}) == "CPU A"
    assert _machines({**here, "run_machines": {"not recorded": 3}}) == (
        "CPU B (where this report was made; the runs did not record theirs)"
    )
    mixed = {**here, "run_machines": {"CPU A": 2, "CPU C": 1, "not recorded": 4}}
    assert _machines(mixed) == "CPU A (2 runs); CPU C (1 run); 4 runs did not record theirs"


def test_wsd_schedule():
    c = TrainConfig(lr=1.0, min_lr=0.1, warmup=4, schedule="wsd", decay_fraction=0.2, steps=100)
    lrs = [c.lr_at(s, 100) for s in range(100)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and set(lrs[4:80]) == {1.0}
    assert lrs[80] < 1.0 and lrs[-1] == pytest.approx(0.1) and c.decay_start(100) == 80
    # before its decay, a longer run's LR is the shorter one's: a checkpoint there is a branch point
    assert [c.lr_at(s, 1000) for s in range(80)] == lrs[:80]
    with pytest.raises(Exception, match="decay_fraction"):
        TrainConfig(schedule="wsd", decay_fraction=0.0)


def test_a_treatment_variant_is_drawn_in_its_base_arms_colour_dashed():
    from upcycle.experiments.regime_plots import _colour, _style

    r = RegimeRecipe.from_dict(load_recipe_mapping(RECIPE))
    for variant, base in (("dense_carry", "dense"), ("moe_scratch_short_decay", "moe_scratch")):
        assert _colour(r, variant) == _colour(r, base) and (_style(r, variant), _style(r, base)) == ("--", "-")
    own = [a for a in r.arms if _style(r, a) == "-"]
    assert len({_colour(r, a) for a in own}) == len(own)  # arms of their own never share a colour
