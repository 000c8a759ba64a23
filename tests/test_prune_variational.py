"""Sparse variational dropout: the KL approximation against the exact KL, the output noise of the
local reparameterization trick against its distribution, masks that leave exact zeros, and a
real run on Fashion-MNIST that prunes most of LeNet-300-100 through the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import deepshrink
from deepshrink.errors import ConfigError
from deepshrink.layers import compressible_weights
from deepshrink.models import build_model
from deepshrink.prune.module import prune_weight, pruning_mask_of, remove_pruning
from deepshrink.prune.variational import (
    K1,
    VariationalWeight,
    finish_variational,
    negative_kl,
    posterior_resolution,
    start_variational,
    variational_dropout,
)
from deepshrink.recipe import recipe_from_dict
from deepshrink.stages.prune import PruneSettings
from deepshrink.train import TrainConfig


@pytest.mark.parametrize("log_alpha", [-6.0, -3.0, -1.0, 0.0, 1.0, 2.0, 3.0, 5.0])
def test_kl_approximation_matches_the_exact_kl_up_to_the_papers_constant(log_alpha):
    """-KL(N(theta, alpha theta^2) || log-uniform) = 0.5 log alpha - E log|1 + sqrt(alpha) eps| + C
    (eps standard normal); the paper's approximation takes C = -k1 and is within 0.01 of it."""
    step = 2e-5
    eps = np.arange(-12.0, 12.0, step) + step / 2  # midpoints: the log singularity is integrable
    density = np.exp(-(eps**2) / 2) / np.sqrt(2 * np.pi)
    exact = 0.5 * log_alpha - np.sum(density * np.log(np.abs(1 + np.exp(log_alpha / 2) * eps))) * step
    approximation = float(negative_kl(torch.tensor(log_alpha, dtype=torch.float64)))
    assert abs(approximation - (exact - K1)) < 0.01


def test_kl_vanishes_as_alpha_grows_and_pushes_alpha_up():
    log_alpha = torch.linspace(-8, 8, 33, dtype=torch.float64, requires_grad=True)
    value = negative_kl(log_alpha)
    assert bool((value <= 0).all()) and abs(float(value[-1].detach())) < 2e-3
    value.sum().backward()
    assert bool((log_alpha.grad > 0).all())  # -KL rises with alpha: the KL alone prunes everything


@pytest.mark.parametrize("layer", [nn.Linear(6, 4), nn.Conv2d(2, 3, 3, padding=1)])
def test_output_noise_has_the_local_reparameterization_distribution(layer):
    """Per output: mean x theta^T (+ bias), variance x^2 sigma^2^T, drawn independently per example."""
    torch.manual_seed(0)
    model = nn.Sequential(layer)
    state = start_variational(model)
    parametrization = state.parametrizations["0"]
    with torch.no_grad():
        parametrization.log_sigma2.copy_(torch.log(torch.rand_like(parametrization.log_sigma2) * 0.05 + 0.01))
    shape = (1, 6) if isinstance(layer, nn.Linear) else (1, 2, 5, 5)
    example = torch.randn(shape)
    repeated = example.expand(40_000, *shape[1:])
    with torch.no_grad():
        samples = model.train()(repeated).double()
        theta = layer.parametrizations.weight.original
        if isinstance(layer, nn.Linear):
            mean = nn.functional.linear(example, theta, layer.bias)
            variance = nn.functional.linear(example**2, parametrization.log_sigma2.exp())
        else:
            mean = nn.functional.conv2d(example, theta, layer.bias, padding=1)
            variance = nn.functional.conv2d(example**2, parametrization.log_sigma2.exp(), padding=1)
    standard_error = (variance.double() / len(repeated)).sqrt()
    assert bool(((samples.mean(0) - mean[0].double()).abs() <= 5 * standard_error[0] + 1e-6).all())
    assert torch.allclose(samples.var(0), variance[0].double(), rtol=0.05, atol=1e-6)
    finish_variational(state)


def test_linears_that_torch_reads_inside_attention_draw_weight_noise_instead():
    """MultiheadAttention's fused path reads out_proj.weight without calling out_proj: a hook there
    would never add noise (and the KL alone would prune every weight), so the weights are noisy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), nn.Linear(8, 3))
    state = start_variational(model)
    by_name = {name: parametrization.on_outputs for name, parametrization in state.parametrizations.items()}
    assert by_name["1"] and not by_name["0.self_attn.out_proj"] and not by_name["0.linear1"]
    out_proj = model[0].self_attn.out_proj
    model.train()
    assert not torch.equal(out_proj.weight, out_proj.weight)  # a fresh draw at every read
    inputs = torch.randn(4, 5, 8)
    assert not torch.equal(model(inputs), model(inputs))
    finish_variational(state)


def test_masks_follow_log_alpha_and_leave_exact_zeros():
    torch.manual_seed(0)
    model = build_model("lenet-300-100")
    state = start_variational(model, ["fc1", "fc2"], threshold=3.0)
    assert "fc3" not in state.parametrizations
    theta = compressible_weights(model)["fc1"].original()
    with torch.no_grad():  # sigma^2 = e^4 theta^2 on the first half of fc1's rows (log alpha 4 > 3), e^-6 elsewhere
        for name in ("fc1", "fc2"):
            original = compressible_weights(model)[name].original()
            state.parametrizations[name].log_sigma2.copy_(torch.log(original**2 + 1e-8) - 6)
        noise = state.parametrizations["fc1"].log_sigma2
        noise[:150] = torch.log(theta[:150] ** 2 + 1e-8) + 4
    model.eval()
    assert bool((model.fc1.weight[:150] == 0).all()) and bool((model.fc1.weight[150:] == theta[150:]).all())
    masks = finish_variational(state)
    assert int(masks["fc1"].sum()) == 150 * 784 and bool(masks["fc2"].all())
    assert isinstance(pruning_mask_of(model.fc1), nn.Module) and not any(
        isinstance(item, VariationalWeight) for item in model.fc1.parametrizations.weight
    )
    assert not model.fc1._forward_hooks  # the output-noise hook is gone
    remove_pruning(model)
    assert bool((model.fc1.weight[:150] == 0).all())  # exactly zero, not small


def test_posterior_std_averages_sigma_over_the_kept_weights_only():
    torch.manual_seed(0)
    model = build_model("lenet-300-100")
    state = start_variational(model, ["fc1", "fc2"], threshold=3.0)
    theta = compressible_weights(model)["fc1"].original().detach()
    with torch.no_grad():  # fc1: rows 0-99 pruned (log alpha 5); the kept rows' sigma^2 = e^-6 theta^2
        log_sigma2 = torch.log(theta**2 + 1e-8) - 6
        log_sigma2[:100] = torch.log(theta[:100] ** 2 + 1e-8) + 5
        state.parametrizations["fc1"].log_sigma2.copy_(log_sigma2)
        state.parametrizations["fc2"].log_sigma2.fill_(-30.0)  # tiny: every fc2 weight kept
    posterior = state.posterior_std()
    expected = torch.exp(0.5 * log_sigma2[100:]).double().mean().item()
    assert posterior["fc1"] == pytest.approx(expected, rel=1e-9)
    assert posterior["fc2"] == pytest.approx(np.exp(-15.0), rel=1e-6)
    with torch.no_grad():  # nothing of fc2 kept: no posterior to report for it
        state.parametrizations["fc2"].log_sigma2.fill_(30.0)
    posterior = state.posterior_std()
    assert set(posterior) == {"fc1"}
    finish_variational(state)
    with torch.no_grad():  # what the masks hide does not count, however large
        model.fc1.parametrizations.weight.original[:100] = 1e3
    resolution = posterior_resolution(model, posterior)
    assert resolution == {"fc1": {"sigma": posterior["fc1"], "span": float(theta[100:].max() - theta[100:].min())}}


def test_refuses_weights_that_are_already_pruned_and_leaves_an_interrupted_model_plain():
    model = build_model("lenet-300-100")
    prune_weight(model.fc1, torch.rand(300, 784) > 0.5)
    with pytest.raises(ConfigError, match="already pruned or shared"):
        start_variational(model)
    plain = build_model("lenet-300-100")
    broken = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 784)), batch_size=4)
    with pytest.raises(ConfigError, match="batches of"):
        variational_dropout(plain, broken, TrainConfig(epochs=1), progress=False)
    assert not any(weight.parametrizations() for weight in compressible_weights(plain).values())
    assert not plain.fc1._forward_hooks

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.randn(784), torch.tensor(0)

    with pytest.raises(ConfigError, match="number of training examples"):
        variational_dropout(plain, torch.utils.data.DataLoader(Stream()), TrainConfig(epochs=1), progress=False)


def test_settings_take_no_sparsity_and_a_target_only_for_the_bits():
    with pytest.raises(ConfigError, match="method: variational does not take sparsity"):
        PruneSettings(method="variational", sparsity={"fc1": 0.9})
    assert PruneSettings(method="variational", layers=["fc1"]).has_target
    with pytest.raises(ConfigError, match="a target chooses only the bits of k-means sharing after it"):
        recipe_from_dict(
            {
                "model": "lenet-300-100",
                "prune": {"method": "variational"},
                "quantize": {"method": "soft"},
                "target": {"ratio": 30},
            }
        )
    recipe = recipe_from_dict(
        {"model": "lenet-300-100", "prune": {"method": "variational"}, "quantize": {}, "target": {"ratio": 30}}
    )
    assert recipe.plans_after_pruning  # tests/test_plan.py runs one
    posterior = {"bits_from": "posterior"}
    with pytest.raises(ConfigError, match="reads the posterior of variational dropout"):
        recipe_from_dict({"model": "lenet-300-100", "prune": {"sparsity": {"fc1": 0.9}}, "quantize": posterior})
    with pytest.raises(ConfigError, match="both choose the bits"):
        recipe_from_dict(
            {
                "model": "lenet-300-100",
                "prune": {"method": "variational"},
                "quantize": posterior,
                "target": {"ratio": 30},
            }
        )
    with pytest.raises(ConfigError, match="leave out `bits`"):
        recipe_from_dict(
            {"model": "lenet-300-100", "prune": {"method": "variational"}, "quantize": posterior | {"bits": {"fc1": 4}}}
        )
    with pytest.raises(ConfigError, match="bits_from"):
        recipe_from_dict(
            {"model": "lenet-300-100", "prune": {"method": "variational"}, "quantize": {"bits_from": "sigma"}}
        )


def test_variational_pruning_through_the_pipeline_prunes_most_weights_at_little_cost(
    small_data, small_lenet_state, tmp_path
):
    """Fashion-MNIST, 5,000 training examples: from a trained LeNet-300-100, three epochs of
    variational dropout and one with the masks fixed, then sharing and encoding as usual."""
    reference = build_model("lenet-300-100")
    reference.load_state_dict(small_lenet_state)
    recipe = {
        "seed": 0,
        # KL / N weighs eleven times as much with 5,000 examples as with the full 55,000: 0.3 of it.
        "prune": {"method": "variational", "retrain_epochs": 3, "finetune_epochs": 1, "kl_weight": 0.3},
        "quantize": {"bits": {"fc*": 5}, "finetune_epochs": 0},
    }
    result = deepshrink.run(reference, recipe, small_data, run_dir=tmp_path, model_name="lenet-300-100", progress=False)
    stage = next(stage for stage in result.stages if stage.name == "prune")
    assert stage.result.metrics["kept_fraction"] < 0.25, stage.result.metrics
    assert result.compressed_metric >= result.reference_metric - 0.03, (
        result.compressed_metric,
        result.reference_metric,
    )
    decoded, _ = deepshrink.load_compressed(result.path)
    for weight in compressible_weights(decoded).values():
        assert torch.unique(weight.value).numel() <= 2**5
    assert result.ratio > 20  # 29.3x when written

    # The same pruned network (the prune stage from the cache, its posterior with it), each
    # layer's bits chosen from that posterior instead.
    posterior = stage.result.log["posterior"]
    assert set(posterior) == {"fc1", "fc2", "fc3"}
    assert all(0 < entry["sigma"] < entry["span"] < 10 for entry in posterior.values()), posterior
    recipe["quantize"] = {"bits_from": "posterior", "finetune_epochs": 0}
    again = deepshrink.run(reference, recipe, small_data, run_dir=tmp_path, model_name="lenet-300-100", progress=False)
    assert next(stage for stage in again.stages if stage.name == "prune").cached
    quantize = next(stage for stage in again.stages if stage.name == "quantize").result
    assert quantize.log["posterior"] == posterior
    decoded, _ = deepshrink.load_compressed(again.path)
    for name, weight in compressible_weights(decoded).items():
        # Linear initialisation spaces the first centroids from the kept weights' minimum to
        # their maximum: the span the prune stage recorded is the one sharing saw.
        start = quantize.tensors[f"{name}/initial_centroids"]
        assert float(start.max() - start.min()) == pytest.approx(posterior[name]["span"], rel=1e-6)
        bits = quantize.log["bits"][name]
        assert bits == min(max(int(np.floor(np.log2(posterior[name]["span"] / posterior[name]["sigma"]))), 1), 8)
        assert torch.unique(weight.value).numel() <= 2**bits


def test_the_figure_6_sweep_adds_the_new_methods_only_where_asked(small_data, small_lenet_state, tmp_path):
    """`tradeoff: {variational_kl_weights: [...]}` adds a variational-dropout-only point and one
    shared at `combined_bits` per KL weight, smaller than the first and sized from real
    encodings, and `soft_taus` a soft weight-sharing point per tau; the plot draws them. Left
    unset, the sweep's record (its cache key) is as before."""
    from deepshrink.recipe import TradeoffSettings, parse_recipe
    from deepshrink.report.figures import plot_tradeoff
    from deepshrink.stages import EncodeSettings, Loaders
    from deepshrink.tradeoff import tradeoff_curves

    recorded = parse_recipe("model: lenet-5\ntradeoff: true\n").section("tradeoff")
    assert not {"variational_kl_weights", "variational_epochs", "soft_taus", "soft_epochs"} & set(recorded)
    reference = build_model("lenet-300-100")
    reference.load_state_dict(small_lenet_state)
    loaders = Loaders.from_splits(small_data)
    settings = TradeoffSettings(
        sparsities=[],
        bits=[],
        svd_budgets=[],
        variational_kl_weights=[0.3],
        variational_epochs=2,
        soft_taus=[5e-3],
        soft_epochs=1,
        retrain_epochs=1,
    )
    curves = tradeoff_curves(reference, settings, EncodeSettings(), loaders, progress=False)
    points = {point["method"]: point for point in curves["points"]}
    assert set(points) == {"variational dropout only", "variational dropout + quantization", "soft weight-sharing"}
    assert points["soft weight-sharing"]["ratio"] > 32 / 5  # at most 17 values: no more than 5 bits a weight
    alone, shared = points["variational dropout only"], points["variational dropout + quantization"]
    assert shared["ratio"] > 3 * alone["ratio"] > 3  # sparse fp32, then 5-bit codes in place of 32-bit values
    assert all(point["metric"] > curves["reference_metric"] - 0.05 for point in points.values()), curves
    plot_tradeoff(curves, tmp_path / "figure6.png")
    assert (tmp_path / "figure6.png").read_bytes()[:4] == b"\x89PNG"
