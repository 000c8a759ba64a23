"""Soft weight-sharing: the mixture prior's density and gradients against a float64 reference and
finite differences, the merging of close components, and a real run on Fashion-MNIST whose
layers end with at most 2^bits distinct values, zero among them, through the whole pipeline."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import deepshrink
from deepshrink.errors import ConfigError
from deepshrink.layers import compressible_weights
from deepshrink.models import build_model
from deepshrink.quantize.shared import sharing_of
from deepshrink.quantize.soft import ZERO_MIXING, GaussianMixturePrior
from deepshrink.recipe import recipe_from_dict
from deepshrink.stages.quantize import QuantizeSettings
from deepshrink.train import TrainConfig


def _prior(components: int = 5) -> GaussianMixturePrior:
    torch.manual_seed(0)
    prior = GaussianMixturePrior(components, -0.4, 0.5, 0.1).double()
    with torch.no_grad():
        prior.mixing_logits.normal_()
        prior.log_precisions.add_(torch.randn(components))
    return prior


def test_negative_log_likelihood_is_the_mixture_density():
    prior = _prior()
    weights = torch.linspace(-0.6, 0.7, 41, dtype=torch.float64)
    mixing = prior.mixing()
    assert float(mixing[0].detach()) == pytest.approx(ZERO_MIXING) and float(mixing.sum().detach()) == pytest.approx(
        1.0
    )
    means, deviations = prior.all_means(), prior.log_precisions.mul(-0.5).exp()
    density = sum(
        mixing[j]
        * torch.exp(-0.5 * ((weights - means[j]) / deviations[j]) ** 2)
        / (deviations[j] * math.sqrt(2 * math.pi))
        for j in range(len(means))
    )
    expected = float(-torch.log(density).sum().detach())
    assert float(prior.negative_log_likelihood(weights).detach()) == pytest.approx(expected, rel=1e-12)


def test_gradients_match_finite_differences():
    """In the weights and in every parameter of the mixture (means, precisions, proportions)."""
    prior = _prior()
    weights = torch.linspace(-0.5, 0.6, 13, dtype=torch.float64, requires_grad=True)
    names = ("means", "log_precisions", "mixing_logits")

    def function(weights, *values):
        return torch.func.functional_call(prior, dict(zip(names, values, strict=True)), (weights,))

    inputs = (weights, *(getattr(prior, name).detach().clone().requires_grad_(True) for name in names))
    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_close_components_merge_and_those_next_to_zero_join_it():
    prior = GaussianMixturePrior(5, -1.0, 1.0).double()
    with torch.no_grad():
        prior.means.copy_(torch.tensor([-0.5, 0.001, 0.3, 0.302]))
        prior.log_precisions.fill_(-2 * math.log(0.02))  # std 0.02 everywhere
    means, group = prior.merged()
    assert means.tolist()[0] == 0.0 and len(means) == 3  # zero, -0.5, and the merged pair near 0.3
    assert means[1] == pytest.approx(-0.5) and 0.3 < means[2] < 0.302
    assert group.tolist() == [0, 1, 0, 2, 2]


def test_soft_sharing_runs_on_a_sequential_model():
    """The prior trains beside the model, not as its child: nn.Sequential calls every child."""
    from deepshrink.quantize import soft

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))
    with torch.no_grad():
        model[2].weight.mul_(20)  # a layer with ten times the other's range
    ranges = {name: float(weight.value.detach().abs().max()) for name, weight in compressible_weights(model).items()}
    data = torch.utils.data.TensorDataset(torch.randn(64, 40), torch.randint(0, 5, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    result = soft.soft_weight_sharing(model, loader, TrainConfig(epochs=1), components=9, progress=False)
    assert [name for name, _ in model.named_children()] == ["0", "1", "2"]
    for name, weight in compressible_weights(model).items():
        assert torch.unique(weight.value).numel() <= len(result.means[name]) <= 9
        # Each layer has its own mixture, spaced over its own range. One mixture over both put
        # every weight of the small layer into the zero component: means spaced for the large
        # layer's range lie beyond all of them.
        assert float(weight.value.detach().abs().max()) <= 1.1 * ranges[name], name
        assert float((weight.value != 0).double().mean()) >= 0.2 and torch.unique(weight.value).numel() >= 3, name


def test_settings_refuse_bits_and_a_target_with_the_soft_method():
    with pytest.raises(ConfigError, match="takes no bits"):
        QuantizeSettings(method="soft", bits={"fc1": 4})
    with pytest.raises(ConfigError, match="layers goes with method soft"):
        QuantizeSettings(layers=["fc1"])
    with pytest.raises(ConfigError, match="method soft learns its codebook"):
        recipe_from_dict({"model": "lenet-300-100", "quantize": {"method": "soft"}, "target": {"ratio": 30}})


def test_soft_sharing_through_the_pipeline_keeps_accuracy_and_the_codebook_limit(
    small_data, small_lenet_state, tmp_path
):
    """Fashion-MNIST, 5,000 training examples, a LeNet-300-100 pruned by magnitude first: three
    epochs under the prior, then the means shared; the file decodes to the shared weights."""
    reference = build_model("lenet-300-100")
    reference.load_state_dict(small_lenet_state)
    recipe = {
        "seed": 0,
        "prune": {"sparsity": {"fc*": 0.8}, "rounds": 1, "retrain_epochs": 1},
        "quantize": {"method": "soft", "components": 9, "soft_epochs": 3, "finetune_epochs": 0},
    }
    result = deepshrink.run(reference, recipe, small_data, run_dir=tmp_path, model_name="lenet-300-100", progress=False)
    assert result.compressed_metric >= result.reference_metric - 0.02, (
        result.compressed_metric,
        result.reference_metric,
    )
    stage = next(stage for stage in result.stages if stage.name == "quantize")
    assert stage.result.log["mixture_means"].keys() == {"fc1", "fc2", "fc3"}
    assert all(len(means) <= 9 for means in stage.result.log["mixture_means"].values())
    decoded, _ = deepshrink.load_compressed(result.path)
    for name, weight in compressible_weights(decoded).items():
        bits = stage.result.log["bits"][name]
        values = torch.unique(weight.value)
        assert values.numel() <= 2**bits <= 16 and 0.0 in values.tolist()
        assert float((weight.value == 0).double().mean()) >= 0.8 - 1e-9  # the pruned weights stay zero


def test_soft_sharing_leaves_the_weights_shared_as_kmeans_does(small_data):
    torch.manual_seed(0)
    model = build_model("lenet-300-100")
    loader = deepshrink.make_loader(small_data.train, 256, shuffle=True, seed=0)
    from deepshrink.quantize.soft import soft_weight_sharing

    result = soft_weight_sharing(
        model, loader, TrainConfig(epochs=1, learning_rate=5e-4), layers=["fc2"], components=5, progress=False
    )
    assert set(result.records) == {"fc2"} and sharing_of(model.fc2) is not None and sharing_of(model.fc1) is None
    assert not hasattr(model, "_soft_sharing_prior")
    shared = model.fc2.weight.detach()
    assert torch.unique(shared).numel() <= 2 ** result.records["fc2"].bits
