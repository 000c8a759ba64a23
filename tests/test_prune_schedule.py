"""Iterative pruning, sensitivity analysis and the per-layer statistics, on real data."""

from __future__ import annotations

import pytest
import torch

from deepshrink.data import make_loader
from deepshrink.models import build_model
from deepshrink.prune.module import current_masks
from deepshrink.prune.schedule import (
    global_sparsity_rule,
    iterative_pruning,
    per_layer_sparsity_rule,
    round_sparsities,
    std_quality_rule,
)
from deepshrink.prune.sensitivity import SensitivityResult, sensitivity_analysis
from deepshrink.prune.statistics import format_table, layer_statistics, totals
from deepshrink.references import train_model
from deepshrink.report.figures import plot_sensitivity
from deepshrink.train import TrainConfig, evaluate


@pytest.fixture(scope="module")
def trained_mlp(small_data):
    model, _ = train_model("lenet-300-100", small_data, TrainConfig(epochs=3, batch_size=64), progress=False)
    return model


def test_round_targets_shrink_density_geometrically():
    rounds = round_sparsities({"fc1": 0.96}, rounds=2)
    assert rounds[0]["fc1"] == pytest.approx(0.8) and rounds[1]["fc1"] == pytest.approx(0.96)


def test_prune_and_retrain_reaches_the_sparsity_and_keeps_accuracy(small_data, trained_mlp):
    model = build_model("lenet-300-100")
    model.load_state_dict(trained_mlp.state_dict())
    validation = make_loader(small_data.validation, 1000, shuffle=False)
    before = evaluate(model, validation).metric
    history = iterative_pruning(
        model,
        make_loader(small_data.train, 64, shuffle=True),
        validation,
        per_layer_sparsity_rule({"fc1": 0.9, "fc2": 0.8, "fc3": 0.5}),
        rounds=2,
        retrain=TrainConfig(epochs=1, learning_rate=0.02),
        progress=False,
    )
    masks = current_masks(model)
    assert int((~masks["fc1"]).sum()) == round(0.9 * 235_200)
    assert int((~masks["fc3"]).sum()) == 500
    assert [record.round for record in history.rounds] == [1, 2]
    assert history.rounds[-1].metric_after_retraining >= before - 0.02
    assert torch.all(model.fc1.weight[~masks["fc1"]] == 0)


def test_sensitivity_curve_starts_at_the_baseline_and_leaves_the_model_intact(small_data, trained_mlp, tmp_path):
    validation = make_loader(small_data.validation, 1000, shuffle=False)
    before = {name: tensor.clone() for name, tensor in trained_mlp.state_dict().items()}
    result = sensitivity_analysis(trained_mlp, validation, sparsities=(0.0, 0.5, 0.99), progress=False)
    assert set(result.metric) == {"fc1", "fc2", "fc3"}
    for accuracies in result.metric.values():
        assert accuracies[0] == result.baseline
        assert accuracies[2] < accuracies[0]
    for name, tensor in trained_mlp.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    path = plot_sensitivity(result, tmp_path / "sensitivity.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suggestion_is_the_largest_sparsity_within_the_allowed_drop():
    result = SensitivityResult(0.90, [0.0, 0.5, 0.8, 0.9], {"a": [0.90, 0.899, 0.893, 0.85], "b": [0.9, 0.7, 0.6, 0.5]})
    assert result.suggest(0.01) == {"a": 0.8, "b": 0.0}


def test_multiply_accumulates_match_hand_counts():
    rows = layer_statistics(build_model("lenet-5"), torch.zeros(2, 1, 28, 28))
    assert {row.name: row.multiply_accumulates for row in rows} == {
        "conv1": 24 * 24 * 20 * 25,
        "conv2": 8 * 8 * 50 * 20 * 25,
        "fc1": 800 * 500,
        "fc2": 500 * 10,
    }
    assert totals(rows)["kept_fraction"] == 1.0
    assert "total" in format_table(rows) and "| conv1 |" in format_table(rows, markdown=True)


def test_global_rule_prunes_the_total_exactly(trained_mlp):
    model = build_model("lenet-300-100")
    model.load_state_dict(trained_mlp.state_dict())
    masks = global_sparsity_rule(0.9, ["fc*"])(model, 1, 1)
    assert sum(int((~mask).sum()) for mask in masks.values()) == round(0.9 * 266_200)


def test_quality_rule_prunes_more_each_round(trained_mlp):
    model = build_model("lenet-300-100")
    model.load_state_dict(trained_mlp.state_dict())
    from deepshrink.prune.module import apply_masks

    rule = std_quality_rule({"fc*": 0.5})
    apply_masks(model, rule(model, 1, 2))
    first = int((~current_masks(model)["fc1"]).sum())
    apply_masks(model, rule(model, 2, 2))
    assert int((~current_masks(model)["fc1"]).sum()) > first > 0
