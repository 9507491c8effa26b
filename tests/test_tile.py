"""upcycle tile: depth tiling from the command line and from a plan file."""

import copy
import json

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

from conftest import rel_diff
from upcycle.cli import main
from upcycle.methods.tiling import tile_order


def _logits(model, ids):
    with torch.no_grad():  # no KV cache: the reference below calls one layer module twice
        return model(ids, use_cache=False).logits


def _run_layers_in_order(dense, order):
    """The dense model with its own layer modules called in `order`: what a tiled model must compute."""
    m = copy.deepcopy(dense)
    m.model.layers = nn.ModuleList([m.model.layers[s] for s in order])
    m.config.num_hidden_layers = len(order)
    if getattr(m.config, "layer_types", None) is not None:
        m.config.layer_types = [dense.config.layer_types[s] for s in order]
    return m.eval()


@pytest.mark.parametrize(
    "flags,order",
    [
        (["--factor", "2"], [0, 1, 2, 3, 0, 1, 2, 3]),
        (["--num_layers", "6", "--mode", "interleave"], [0, 0, 1, 2, 2, 3]),
    ],
)
def test_tile_cli_writes_a_stock_model_that_runs_the_layers_in_tile_order(tmp_path, tiny_dir_tok, ids, flags, order):
    assert main(["tile", "--model", str(tiny_dir_tok), "--out", str(tmp_path / "deep")] + flags) == 0
    deep = AutoModelForCausalLM.from_pretrained(tmp_path / "deep", dtype=torch.float32).eval()  # stock class
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir_tok, dtype=torch.float32).eval()
    cfg = json.loads((tmp_path / "deep" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == len(order) and cfg["depth_tiling"]["source_of_layer"] == order
    for j, s in enumerate(order):  # every layer a copy of its source layer
        for (k, a), (_, b) in zip(
            deep.model.layers[j].state_dict().items(), dense.model.layers[s].state_dict().items()
        ):
            assert torch.equal(a, b), (j, k)
    assert torch.equal(deep.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    # what it preserves: the deeper model is exactly the dense layers applied in tile order
    assert rel_diff(_logits(deep, ids), _logits(_run_layers_in_order(dense, order), ids)) <= 1e-6
    assert rel_diff(_logits(deep, ids), _logits(dense, ids)) > 1e-2  # and not the dense function
    assert (tmp_path / "deep" / "tokenizer.json").is_file()
    out = deep.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)  # the KV cache has a slot per layer
    assert out.shape == (1, 7)


def test_tile_plan_file_and_errors(tmp_path, tiny_dir, capsys):
    (tmp_path / "tile.yaml").write_text("method: depth_tiling\nfactor: 1.5\nmode: interleave\n")
    assert (
        main(["tile", "--model", str(tiny_dir), "--plan", str(tmp_path / "tile.yaml"), "--out", str(tmp_path / "a")])
        == 0
    )
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["depth_tiling"]["source_of_layer"] == tile_order(4, 6, "interleave")
    assert cfg["depth_tiling"]["plan"] == {
        "method": "depth_tiling",
        "num_layers": None,
        "factor": 1.5,
        "mode": "interleave",
    }
    # a flag overrides the file (num_layers replaces its factor)
    assert (
        main(
            [
                "tile",
                "--model",
                str(tiny_dir),
                "--plan",
                str(tmp_path / "tile.yaml"),
                "--num_layers",
                "5",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "b" / "config.json").read_text())["num_hidden_layers"] == 5
    capsys.readouterr()
    assert main(["tile", "--model", str(tiny_dir), "--out", str(tmp_path / "c")]) == 2
    assert "exactly one of num_layers or factor" in capsys.readouterr().err
    assert main(["tile", "--model", str(tiny_dir), "--num_layers", "2", "--out", str(tmp_path / "c")]) == 2
    assert "makes a model deeper" in capsys.readouterr().err and not (tmp_path / "c").exists()
    (tmp_path / "bad.yaml").write_text("method: sparse_upcycling\nfactor: 2\n")
    assert (
        main(["tile", "--model", str(tiny_dir), "--plan", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "c")])
        == 2
    )
    assert "method: depth_tiling" in capsys.readouterr().err
