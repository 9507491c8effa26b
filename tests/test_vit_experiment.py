"""Smoke test of the ViT upcycling experiment (`upcycle vit-experiment --tiny`): the arms run, budgets are
matched in FLOPs, results files come out; plus the pieces the numbers rest on (FLOP count, linear probe,
augmentation)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from upcycle.cli import main
from upcycle.errors import UpcycleError
from upcycle.experiments.vit import VitRecipe, augment, dense_vit, flops_per_image, linear_probe, tokens_per_image

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "vit-small.yaml"


def test_tiny_run_matches_budgets_and_writes_results(tmp_path, capsys):
    out = tmp_path / "vit"
    assert main(["vit-experiment", str(RECIPE), "--tiny", "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    info = json.loads((out / "results.json").read_text())["info"]
    recipe = VitRecipe.from_yaml(RECIPE, tiny=True)
    assert {r["arm"] for r in rows} == set(recipe.arms)
    fpi = info["flops_per_image"]
    assert fpi["upcycled"] > fpi["dense"]  # expert choice C = 2: two experts' MLP per token in the MoE layers
    for r in rows:
        b, extra = float(r["budget"]), float(r["extra_compute"])
        assert 0 <= float(r["accuracy"]) <= 1 and 0 <= float(r["probe_accuracy"]) <= 1
        if b > 0:  # each arm gets the steps its own FLOPs allow: within one step of the budget
            one = fpi[r["arm"]] * recipe.batch_size / info["pretrain_flops"]
            assert abs(extra - b) <= one / 2 + 1e-9
    dense_steps = max(int(r["steps"]) for r in rows if r["arm"] == "dense")
    up_steps = max(int(r["steps"]) for r in rows if r["arm"] == "upcycled")
    assert dense_steps > up_steps
    # same start for the arms that preserve the function up to tokens left behind (normalised)
    start = {r["arm"]: r for r in rows if float(r["budget"]) == 0}
    assert start["upcycled"]["accuracy"] == start["upcycled_fresh"]["accuracy"]
    assert (out / "accuracy_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "10-shot linear probe" in (out / "results.md").read_text()


def test_flops_per_image_counts_expert_choice_capacity():
    from upcycle import UpcyclePlan, upcycle

    recipe = VitRecipe()
    dense = dense_vit(recipe)
    c = dense.config
    T, D, Fd, L = tokens_per_image(c), c.hidden_size, c.intermediate_size, c.num_hidden_layers
    assert T == 17
    moe = upcycle(dense, UpcyclePlan(num_experts=8, router="expert_choice", capacity_factor=2.0))
    # Each expert takes ceil(2 * 17 / 8) = 5 of an image's 17 tokens: 40/17 = 2.35 experts per token, not C = 2.
    k = 8 * 5 / 17
    extra = 2 * (8 * D + (k - 1) * 2 * D * Fd)  # two MoE layers: router + k - 1 more MLPs' matmuls per token
    assert abs(flops_per_image(moe) - flops_per_image(dense) - 6 * T * extra) <= 1
    assert flops_per_image(moe, dense=True) == flops_per_image(dense)
    body = 4 * D + L * (4 * D * D + 2 * D * Fd)  # patch projection (1x2x2 -> D) + attention + MLP
    assert flops_per_image(dense) == 6 * T * body + 6 * 10 * D + 12 * L * D * T * T


def test_linear_probe_and_augment():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat(20)
    f = torch.nn.functional.one_hot(y, 10).float() * 3 + 0.1 * torch.randn(200, 10, generator=g)
    assert linear_probe(f, y, f, y, shots=5, draws=2, ridge=1e-2, seed=0) == 1.0
    noise = torch.randn(200, 10, generator=g)
    assert linear_probe(noise, y, noise, y, shots=5, draws=2, ridge=1e-2, seed=0) < 0.6
    x = torch.arange(64.0).view(1, 1, 8, 8).expand(50, 1, 8, 8)
    a = augment(x, g)
    assert a.shape == x.shape and not torch.equal(a, x) and (a == 0).any()  # shifted in, zero padding


def test_recipe_errors():
    with pytest.raises(UpcycleError, match="arms"):
        VitRecipe(arms=["dense", "nope"])
    with pytest.raises(UpcycleError, match="extra"):
        VitRecipe(extra=[])
