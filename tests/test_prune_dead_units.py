"""Clearing dead units (prune/dead_units.py): exact, and only where the graph allows it."""

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from deepshrink.errors import ConfigError
from deepshrink.prune.dead_units import clear_dead_units
from deepshrink.prune.module import prune_weight, pruning_mask_of
from deepshrink.stages.prune import PruneSettings


class ThreeLayers(nn.Module):
    """An MLP whose activations are a module, a function and a method, with dropout between."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 10)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(10, 8)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x):
        hidden = self.drop(self.act(self.fc1(x)))
        return self.fc3(F.relu(self.fc2(hidden)).tanh())


def _with_dead_units(model: ThreeLayers) -> ThreeLayers:
    """fc1: units 0-2 read nothing, of which 0 and 1 are read by fc2; units 3 and 4 are not read.
    fc2: unit 5 reads nothing (after the fold) and is read by fc3."""
    torch.manual_seed(0)
    for layer in (model.fc1, model.fc2, model.fc3):
        nn.init.normal_(layer.bias, std=0.5)
    keep1 = torch.rand(10, 12) < 0.6
    keep1[0:3] = False
    keep2 = torch.rand(8, 10) < 0.6
    keep2[:, 0:2] = True
    keep2[:, 2:5] = False
    keep2[5] = False
    keep3 = torch.rand(3, 8) < 0.7
    keep3[:, 5] = True
    for layer, keep in ((model.fc1, keep1), (model.fc2, keep2), (model.fc3, keep3)):
        prune_weight(layer, keep)
    return model


def test_outputs_stay_the_same_and_dead_biases_are_zero() -> None:
    model = _with_dead_units(ThreeLayers()).double().eval()
    inputs = torch.randn(64, 12, dtype=torch.float64)
    before = model(inputs)
    done = clear_dead_units(model)
    after = model(inputs)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-12)
    by_layer = {item.layer: item for item in done}
    assert (by_layer["fc1"].reader, by_layer["fc1"].unread, by_layer["fc1"].folded) == ("fc2", 3, 2)
    assert by_layer["fc2"].folded == 1
    assert torch.equal(model.fc1.bias[:5], torch.zeros(5, dtype=torch.float64))
    assert model.fc2.bias[5] == 0
    # The folded units' columns are pruned in their masks, so retraining keeps them at zero.
    assert not pruning_mask_of(model.fc2).mask[:, 0:2].any()
    assert not pruning_mask_of(model.fc3).mask[:, 5].any()
    assert not model.fc2.weight[:, 0:5].any()
    # A second pass finds nothing more to fold: the first left no read unit without inputs.
    assert all(item.folded == 0 for item in clear_dead_units(model))
    torch.testing.assert_close(model(inputs), before, rtol=0, atol=1e-12)


class TwoLayers(nn.Module):
    """Two Linear layers; each subclass joins them its own way."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)


class SkipConnection(TwoLayers):
    """fc1's output also goes around fc2: a unit fc2 does not read is still used."""

    def forward(self, x):
        hidden = self.fc1(x)
        return self.fc2(torch.relu(hidden)) + hidden


class NotElementwise(TwoLayers):
    """A softmax mixes the units: a constant unit does not give a constant output."""

    def forward(self, x):
        return self.fc2(torch.softmax(self.fc1(x), dim=-1))


class Untraceable(TwoLayers):
    """Control flow on a tensor's value: torch.fx cannot trace it."""

    def forward(self, x):
        hidden = torch.relu(self.fc1(x))
        if hidden.sum() > 0:
            hidden = hidden * 2
        return self.fc2(hidden)


@pytest.mark.parametrize("model_class", [SkipConnection, NotElementwise, Untraceable])
def test_units_whose_output_goes_elsewhere_are_left_alone(model_class) -> None:
    model = model_class()
    keep1 = torch.ones(6, 6, dtype=torch.bool)
    keep1[0] = False
    keep2 = torch.ones(6, 6, dtype=torch.bool)
    keep2[:, 1] = False
    prune_weight(model.fc1, keep1)
    prune_weight(model.fc2, keep2)
    biases = [model.fc1.bias.detach().clone(), model.fc2.bias.detach().clone()]
    assert clear_dead_units(model) == []
    assert torch.equal(model.fc1.bias, biases[0]) and torch.equal(model.fc2.bias, biases[1])


def test_the_prune_setting_names_its_choices() -> None:
    with pytest.raises(ConfigError, match="dead_units='remove' should be one of keep, clear"):
        PruneSettings(method="variational", dead_units="remove")


def test_the_prune_stage_clears_dead_units_when_asked() -> None:
    """Without data, magnitude pruning at 95% empties rows of the small layers; `dead_units:
    clear` zeroes their biases and the outputs stay those of the same pruning with `keep`."""
    from deepshrink.stages.base import StageContext
    from deepshrink.stages.prune import prune_stage, summarize

    models, results = {}, {}
    for choice in ("keep", "clear"):
        torch.manual_seed(3)
        models[choice] = ThreeLayers().eval()
        settings = PruneSettings(sparsity={"*": 0.95}, rounds=1, dead_units=choice)
        results[choice] = prune_stage(models[choice], settings, StageContext(loaders=None, progress=False))
    inputs = torch.randn(32, 12)
    torch.testing.assert_close(models["clear"](inputs), models["keep"](inputs), rtol=1e-6, atol=1e-6)
    cleared = results["clear"].log["dead_units"]
    assert "dead_units" not in results["keep"].log and sum(item["unread"] for item in cleared) > 0
    assert (models["clear"].fc1.bias == 0).sum() > (models["keep"].fc1.bias == 0).sum()
    assert "biases cleared" in summarize(models["clear"], results["clear"])


def test_the_report_says_which_biases_were_cleared() -> None:
    from types import SimpleNamespace

    from deepshrink.report import stage_lines
    from deepshrink.stages.base import StageResult

    log = {"dead_units": [{"layer": "fc1", "reader": "fc2", "unread": 174, "folded": 2}]}
    stage = SimpleNamespace(
        name="prune", cached=False, seconds=1.0, key="0" * 64, result=StageResult("prune", log, {"kept_fraction": 0.03})
    )
    (line,) = stage_lines(SimpleNamespace(stages=[stage], metric_name="top-1 accuracy"))
    assert line.endswith("3.00% of weights kept, biases of dead units cleared (176 of fc1) (key 000000000000)")
