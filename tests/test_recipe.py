"""Recipes: validation names the bad key; flags and files build the same passes."""

from __future__ import annotations

import json

import pytest

from onnxslim_tool.passes.normalize import Cleanup
from onnxslim_tool.recipe import Recipe, RecipeError, recipe_from_flags


def test_recipe_from_dict_builds_passes_with_params():
    recipe = Recipe.from_dict(
        {"passes": ["cleanup", {"pass": "cleanup", "fold_batchnorm": False}], "seed": 3}
    )
    built = recipe.build()
    assert [type(p) for p in built] == [Cleanup, Cleanup]
    assert built[1].fold_batchnorm is False
    assert recipe.seed == 3


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (
            {"passes": [{"pass": "cleanup", "fold_bn": True}]},
            "no parameter 'fold_bn' (did you mean 'fold_batchnorm'?); allowed:",
        ),
        ({"passes": ["no-such-pass"]}, "unknown pass 'no-such-pass'; available: cleanup"),
        ({"passes": []}, "non-empty 'passes'"),
        ({"passes": ["cleanup"], "budget": 1}, "unknown recipe key 'budget'"),
        ({"passes": [{"fold_batchnorm": True}]}, "'pass' key"),
    ],
)
def test_bad_recipes_name_the_problem(data, fragment):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(data)
    assert fragment in str(info.value)


def test_recipe_files_yaml_and_json(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "passes:\n  - pass: cleanup\n    fold_constants: false\nmax_drop: 0.01\n"
    )
    (tmp_path / "r.json").write_text(json.dumps({"passes": ["cleanup"]}))
    yaml_recipe = Recipe.from_file(tmp_path / "r.yaml")
    assert yaml_recipe.max_drop == 0.01 and yaml_recipe.name == "r"
    assert yaml_recipe.build()[0].fold_constants is False
    assert Recipe.from_file(tmp_path / "r.json").steps[0].name == "cleanup"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RecipeError, match="cannot parse recipe"):
        Recipe.from_file(tmp_path / "bad.json")
    with pytest.raises(RecipeError, match="not found"):
        Recipe.from_file(tmp_path / "missing.yaml")


def test_flags_order_passes_so_they_compose():
    recipe = recipe_from_flags(
        prune_channels=0.3, lowrank=0.5, prune_weights=0.5, share_bits=4, quantize="int8", exclude=["head*"]
    )
    names = [s.name for s in recipe.steps]
    assert names == [
        "cleanup",
        "channel-pruning",
        "cleanup",
        "lowrank",
        "weight-pruning",
        "weight-sharing",
        "quantize",
    ]
    assert recipe.steps[0].params["fold_batchnorm"] is False  # bn_gamma needs the BatchNorms
    assert all(s.params["exclude"] == ["head*"] for s in recipe.steps)
    assert [s.name for s in recipe_from_flags().steps] == ["cleanup"]


def test_share_method_alone_means_sharing_with_that_method():
    recipe = recipe_from_flags(share_method="ternary")
    (step,) = [s for s in recipe.steps if s.name == "weight-sharing"]
    assert step.params["method"] == "ternary" and "bits" not in step.params


def test_lowrank_rank_rule_alone_means_low_rank_with_that_rule():
    recipe = recipe_from_flags(lowrank_rank="vbmf", lowrank_method="tucker")
    (step,) = [s for s in recipe.steps if s.name == "lowrank"]
    assert step.params["rank_rule"] == "vbmf" and step.params["method"] == "tucker"


def test_pass_names_are_forgiving_and_bad_keys_are_named():
    from onnxslim_tool.recipe import Recipe, RecipeError

    recipe = Recipe.from_dict({"passes": [{"name": "Prune_Channels", "ratio": 0.3}, "quantization"]})
    assert [s.name for s in recipe.steps] == ["channel-pruning", "quantize"]
    with pytest.raises(RecipeError, match=r"no parameter 'ratioo' \(did you mean 'ratio'\?\)"):
        Recipe.from_dict({"passes": [{"name": "prune_channels", "ratioo": 0.3}]})
    with pytest.raises(
        RecipeError, match=r"unknown pass 'prune-chanels' \(did you mean 'channel-pruning'\?\)"
    ):
        Recipe.from_dict({"passes": ["prune-chanels"]})
