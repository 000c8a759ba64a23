"""Recipes are validated before anything runs, and every error names the file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepshrink.errors import ConfigError
from deepshrink.recipe import (
    DistillSettings,
    PruneSettings,
    QuantizeSettings,
    TradeoffSettings,
    load_recipe,
    parse_recipe,
    recipe_from_dict,
)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"  # a link to src/deepshrink/recipes


def test_full_recipe_reads_every_section():
    recipe = parse_recipe(
        "model: lenet-5\n"
        "seed: 3\n"
        "data: {train_subset: 100}\n"
        "prune:\n"
        "  sparsity: {conv*: 0.5, fc1: 0.9}\n"
        "  rounds: 2\n"
        "  weight_decay: 5e-4\n"  # YAML 1.1 reads this as a string; it means a number
        "  distill:\n"
        "quantize: {bits: {conv*: 8, fc*: 5}, init: density}\n"
        "encode: {index_bits: {conv*: 5}, coder: fixed}\n"
        "tradeoff: true\n"
    )
    assert recipe.model == "lenet-5" and recipe.seed == 3 and recipe.data.train_subset == 100
    assert recipe.prune == PruneSettings(
        sparsity={"conv*": 0.5, "fc1": 0.9}, rounds=2, weight_decay=5e-4, distill=DistillSettings()
    )
    assert recipe.quantize == QuantizeSettings(bits={"conv*": 8, "fc*": 5}, init="density")
    assert recipe.encode.index_bits == {"conv*": 5} and recipe.encode.coder == "fixed"
    assert recipe.tradeoff == TradeoffSettings()


def test_left_out_stages_are_skipped():
    recipe = parse_recipe("model: lenet-300-100\nquantize: {bits: {'*': 4}}\n")
    assert recipe.prune is None and recipe.tradeoff is None and recipe.quantize.bits == {"*": 4}


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("model: lenet-5\nprune:\n  sparsty: {fc1: 0.9}\n", 3, "unknown key 'sparsty' in prune"),
        ("model: lenet-5\nquantize:\n  init: kmeans++\n", 3, "should be one of linear, density, forgy, optimal"),
        ("model: lenet-5\nprune:\n  sparsity: {fc1: 1.5}\n", 3, "prune.sparsity.fc1 is 1.5; it should be below 1.0"),
        ("model: lenet-5\nquantize:\n  bits: {fc1: 5.5}\n", 3, "quantize.bits.fc1 is '5.5'; it should be an int"),
        ("model: lenet-5\nquantize:\n  bits: {fc1: 0}\n", 3, "should be at least 1"),
        ("model: lenet-5\nprune:\n  rounds: 2\n", 2, "needs exactly one of global_sparsity, quality, sparsity"),
        ("model: lenet-5\nprune:\n  global_sparsity: 0.9\n  method: dns\n", 3, "dns does not take global_sparsity"),
        ("model: lenet-5\nprune:\n  quality: {fc1: 1}\n  method: dns\n", 3, "or crate: {LAYER_GLOB: C}"),
        ("model: lenet-5\nprune:\n  crate: {fc1: 1}\n", 3, "magnitude does not take crate"),
        ("model: lenet-5\nseed: yes\n", 2, "seed is 'yes'; it should be an int"),
        ("model: lenet-5\ntradeoff:\n  bits: []\n", 3, "should be a non-empty list"),
        ("model: lenet-5\nprune: [1, 2]\n", 2, "prune should be a mapping"),
        ("model: lenet-5\nmodel: lenet-5\n", 2, "appears twice"),
        ("model: lenet-5\nencode: {layout: coo}\n", 2, "should be one of csr, csc, dense"),
        ("model: lenet-5\nlowrank:\n  projection: l2\n", 3, "should be one of euclidean, cost, both"),
        ("model: [lenet\n", 2, "not valid YAML"),
    ],
)
def test_bad_recipes_name_the_line(text, line, message):
    with pytest.raises(ConfigError) as error:
        parse_recipe(text, "bad.yaml")
    assert f"bad.yaml:{line}:" in str(error.value)
    assert message in str(error.value)


def test_empty_and_missing_recipes_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="empty"):
        parse_recipe("", "empty.yaml")
    with pytest.raises(ConfigError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")


def test_a_glob_that_matches_no_layer_names_its_line():
    recipe = parse_recipe("model: lenet-5\nprune:\n  sparsity:\n    conv1: 0.2\n    fc9: 0.9\n", "r.yaml")
    with pytest.raises(ConfigError, match=r"r\.yaml:5: prune\.sparsity pattern 'fc9' matches no layer"):
        recipe.check_layers(["conv1", "conv2", "fc1", "fc2"])
    parse_recipe("quantize: {bits: {'conv*': 8}}").check_layers(["conv1", "fc1"])


def test_dicts_are_validated_like_files():
    assert recipe_from_dict({"prune": {"global_sparsity": 0.9}}).prune.global_sparsity == 0.9
    with pytest.raises(ConfigError, match="unknown key 'oops'"):
        recipe_from_dict({"oops": 1})


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda path: path.name)
def test_shipped_recipes_are_valid(path):
    from deepshrink.layers import compressible_weights
    from deepshrink.models import build_model

    recipe = load_recipe(path)
    model = build_model(recipe.model or "lenet-5")  # a recipe without a model is for any model
    recipe.check_layers(list(compressible_weights(model)))


def test_shipped_recipes_load_by_name():
    assert load_recipe("lenet-300-100").model == "lenet-300-100"
    with pytest.raises(ConfigError, match="shipped recipe: .*lenet-300-100"):
        load_recipe("lenet-301")


def test_distill_mixup_is_recorded_only_when_set():
    """A nested setting added later (distill's mixup) leaves the keys of recipes without it as
    they were, and changes them when set."""
    plain = parse_recipe("prune: {sparsity: {fc1: 0.5}, distill: {temperature: 3}}\n").section("prune")
    assert plain["distill"] == {"temperature": 3.0, "alpha": 0.5}
    mixed = parse_recipe("prune: {sparsity: {fc1: 0.5}, distill: {temperature: 3, mixup: 1}}\n").section("prune")
    assert mixed["distill"] == {"temperature": 3.0, "alpha": 0.5, "mixup": 1.0}
    with pytest.raises(ConfigError, match="mixup"):
        parse_recipe("prune: {sparsity: {fc1: 0.5}, distill: {mixup: -1}}\n")
