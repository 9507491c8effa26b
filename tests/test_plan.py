import pytest

from upcycle import PlanError, UpcyclePlan
from upcycle.methods.layers import select_layers


def test_defaults_follow_the_paper():
    p = UpcyclePlan()
    assert (p.num_experts, p.router, p.top_k, p.router_init, p.router_std) == (8, None, 2, "normal", 0.02)
    # no router named: the family's, top-k in decoders and expert choice (C = 2) in encoders and ViT
    assert p.for_family(causal=True).router == "topk"
    assert (p.for_family(causal=False).router, p.for_family(causal=False).capacity) == ("expert_choice", 2.0)
    assert UpcyclePlan(router="topk").for_family(causal=False).router == "topk"  # a named router is kept
    assert select_layers(p.layers, 30) == list(range(1, 30, 2))  # every other layer, starting with the second
    assert p.normalize_weights and p.capacity is None
    assert UpcyclePlan(router="expert_choice").capacity == 2.0


@pytest.mark.parametrize(
    "spec,L,expected",
    [
        ("all", 4, [0, 1, 2, 3]),
        ("every_k:2", 6, [1, 3, 5]),
        ("every_k:3:0", 7, [0, 3, 6]),
        ("first_n:2", 5, [0, 1]),
        ("last_n:2", 5, [3, 4]),
        ("middle_n:2", 6, [2, 3]),
        ("middle_n:3", 30, [14, 15, 16]),
        ("4,0,2", 5, [0, 2, 4]),
        ([3, 1], 5, [1, 3]),
    ],
)
def test_layer_selection(spec, L, expected):
    assert select_layers(spec, L) == expected


@pytest.mark.parametrize(
    "spec,msg",
    [
        ([99], "index 99 is out of range: the model has 30 layers"),
        ("last_n:31", "asks for 31 layers"),
        ("every_k:2:2", "OFFSET < K"),
        ("some", "unknown selection"),
        ("1,a", "not a comma-separated list"),
        ([], "empty"),
        ([1, 1], "repeats"),
    ],
)
def test_bad_layer_selection(spec, msg):
    with pytest.raises(PlanError, match=msg):
        select_layers(spec, 30)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(num_experts=0), "num_experts: must be at least 1"),
        (dict(top_k=9), "top_k: must be between 1 and num_experts=8"),
        (dict(top_k=0), "top_k"),
        (dict(capacity_factor=0), "capacity_factor: must be a positive number"),
        (dict(capacity_factor=-1.5), "capacity_factor"),
        (dict(router="hash"), "unknown router 'hash'"),
        (dict(router="soft", capacity_factor=1.0), "no capacity"),
        (dict(router_std=-0.1), "router_std"),
        (dict(expert_init="random"), "expert_init"),
        (dict(num_experts=2.5), "expected an integer"),
    ],
)
def test_plan_validation(kw, msg):
    with pytest.raises(PlanError, match=msg):
        UpcyclePlan(**kw)


def test_yaml_round_trip(tmp_path):
    p = UpcyclePlan(num_experts=4, layers=[0, 2], router="expert_choice", capacity_factor=4.0, normalize=False, seed=7)
    f = tmp_path / "plan.yaml"
    p.to_yaml(f)
    assert UpcyclePlan.from_yaml(f) == p
    assert "num_experts: 4" in f.read_text()  # the YAML keys are the field names


def test_yaml_errors_name_the_file_and_key(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("num_experts: 8\nexperts_per_token: 2\n")
    with pytest.raises(PlanError, match=r"p.yaml: unknown key 'experts_per_token'"):
        UpcyclePlan.from_yaml(f)
    f.write_text("num_experts: 0\n")
    with pytest.raises(PlanError, match=r"p.yaml: num_experts"):
        UpcyclePlan.from_yaml(f)
    with pytest.raises(PlanError, match="plan file not found"):
        UpcyclePlan.from_yaml(tmp_path / "missing.yaml")


def test_example_plans_load():
    from pathlib import Path

    plans = Path(__file__).resolve().parents[1] / "examples" / "plans"
    paper = UpcyclePlan.from_yaml(plans / "paper-decoder.yaml")
    assert (paper.num_experts, paper.router, paper.top_k, paper.normalize_weights) == (32, "topk", 2, True)
    assert select_layers(paper.layers, 30) == list(range(1, 30, 2))
    ec = UpcyclePlan.from_yaml(plans / "expert-choice.yaml")
    assert (ec.router, ec.capacity) == ("expert_choice", 2.0)


def test_every_file_of_dataclasses_reads_numbers_by_field_type(tmp_path):
    """YAML 1.1 reads 2e-2 and 3e7 as strings: each file type takes them by the field's type, in one place."""
    from upcycle.experiments.bam_recipe import BamRecipe
    from upcycle.experiments.recipe import Recipe
    from upcycle.experiments.regime_recipe import RegimeRecipe
    from upcycle.experiments.vit import VitRecipe
    from upcycle.methods.bam import BamPlan
    from upcycle.methods.tiling import DepthTilingPlan
    from upcycle.train.config import TrainConfig

    p = tmp_path / "plan.yaml"
    p.write_text("router_std: 2e-2\nnum_experts: 8.0\nlayers: all\n")
    plan = UpcyclePlan.from_yaml(p)
    assert plan.router_std == 0.02 and plan.num_experts == 8 and isinstance(plan.num_experts, int)
    assert plan.layers == "all"
    p.write_text("num_experts: 8.5\n")
    with pytest.raises(PlanError, match=r"plan.yaml: num_experts must be an integer, got 8.5"):
        UpcyclePlan.from_yaml(p)
    assert BamPlan.from_dict({"router_std": "1e-2"}).router_std == 0.01
    assert DepthTilingPlan.from_dict({"method": "depth_tiling", "factor": "2e0"}).factor == 2.0

    cfg = TrainConfig.from_dict({"lr": "3e-4", "steps": "1e3", "pretrain_tokens": "2e6"})
    assert (cfg.lr, cfg.steps, cfg.pretrain_tokens) == (3e-4, 1000, 2e6) and isinstance(cfg.steps, int)
    from pathlib import Path

    from upcycle.io.yamlio import read_mapping

    recipes = Path(__file__).parent.parent / "recipes"
    tiny = read_mapping(recipes / "tiny.yaml", "recipe")
    rec = Recipe.from_dict({**tiny, "lr": "1e-3", "pretrain_tokens": "3e7"})
    assert (rec.lr, rec.pretrain_tokens) == (1e-3, 30_000_000) and isinstance(rec.pretrain_tokens, int)
    regime = read_mapping(recipes / "upcycling-regime.yaml", "recipe")
    assert RegimeRecipe.from_dict({**regime, "lr": "3e-3", "eval_every": "5e-2"}).eval_every == 0.05
    vit = read_mapping(recipes / "vit-small.yaml", "recipe")
    assert VitRecipe.from_dict({**vit, "lr": "1e-3"}).lr == 1e-3  # was kept as the string '1e-3'
    q = tmp_path / "bam.yaml"
    q.write_text((recipes / "bam-small.yaml").read_text().replace("mix_lr: 1.0e-3", "mix_lr: 5e-4"))
    assert BamRecipe.from_yaml(q).mix_lr == 5e-4


def test_every_study_recipe_reads_its_tiny_overrides_one_way(tmp_path):
    """One recipe_from_dict for the four study recipes: a ViT recipe without `tiny:` used to run at full size
    under --tiny, and a BAM recipe's misspelt tiny key ended in a TypeError traceback."""
    from pathlib import Path

    from upcycle.errors import UpcycleError
    from upcycle.experiments.bam_recipe import BamRecipe
    from upcycle.experiments.vit import VitRecipe
    from upcycle.io.yamlio import read_mapping

    recipes = Path(__file__).parent.parent / "recipes"
    vit = read_mapping(recipes / "vit-small.yaml", "recipe")
    assert VitRecipe.from_dict(vit, tiny=True).name == f"{vit['name']} (tiny)"
    with pytest.raises(UpcycleError, match=r"--tiny needs a `tiny:` section"):
        VitRecipe.from_dict({k: v for k, v in vit.items() if k != "tiny"}, tiny=True)
    bam = tmp_path / "bam.yaml"
    bam.write_text((recipes / "bam-small.yaml").read_text().replace("tiny:\n", "tiny:\n  mix_stepz: 3\n", 1))
    with pytest.raises(UpcycleError, match=r"bam.yaml: tiny: unknown key 'mix_stepz'"):
        BamRecipe.from_yaml(bam, tiny=True)
    with pytest.raises(UpcycleError, match=r"tiny: expected a mapping of recipe keys, got int"):
        VitRecipe.from_dict({**vit, "tiny": 5}, tiny=True)
