"""SVD low-rank factorization and budgeted rank selection."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from deepshrink.errors import ConfigError
from deepshrink.lowrank import (
    compression_rate,
    factorize,
    layer_spectra,
    parameter_count,
    select_cptv,
    select_pos,
    storage,
)
from deepshrink.lowrank.relaxed import RelaxedOptions, Selection, select_relaxed


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, (3, 5), stride=(2, 1), padding=(1, 2))
        self.conv2 = nn.Conv2d(16, 32, 3, stride=(1, 2), padding=1, dilation=(2, 1), bias=False)
        self.fc = nn.Linear(32 * 3 * 8, 40)
        self.out = nn.Linear(40, 10)

    def forward(self, inputs):
        hidden = torch.relu(self.conv2(torch.relu(self.conv1(inputs))))
        return self.out(torch.relu(self.fc(hidden.flatten(1))))


@pytest.fixture
def net_and_input():
    torch.manual_seed(0)
    return Net().eval(), torch.randn(4, 3, 9, 16)


@pytest.mark.parametrize("scheme", ["zhang", "tai"])
def test_full_rank_factorization_equals_the_original(net_and_input, scheme):
    model, inputs = net_and_input
    spectra = layer_spectra(model, inputs, scheme)
    full = {name: spectrum.full_rank for name, spectrum in spectra.items()}
    factored = factorize(copy.deepcopy(model), spectra, full)
    assert isinstance(factored.conv1, nn.Sequential) and isinstance(factored.fc, nn.Sequential)
    with torch.no_grad():
        expected = model(inputs)
        assert torch.allclose(factored(inputs), expected, atol=1e-5 * expected.abs().max())


@pytest.mark.parametrize("scheme", ["zhang", "tai"])
def test_mac_and_parameter_counts_match_the_factored_layers(net_and_input, scheme):
    """The counts each spectrum predicts equal those of the layers actually built and run."""
    from deepshrink.prune.statistics import _multiply_accumulates

    model, inputs = net_and_input
    spectra = layer_spectra(model, inputs, scheme)
    ranks = {"conv1": 2, "conv2": 3, "fc": 4, "out": None}
    factored = factorize(copy.deepcopy(model), spectra, ranks)
    measured = _multiply_accumulates(factored, inputs)
    for name, rank in ranks.items():
        if rank is None:
            assert measured[name] == spectra[name].dense_macs
            continue
        assert measured[f"{name}.0"] + measured[f"{name}.1"] == spectra[name].macs(rank)
        weights = sum(layer.weight.numel() for layer in getattr(factored, name))
        assert weights == spectra[name].factored_parameters(rank)


def test_hand_computed_counts():
    # Linear 300 x 784 at rank 20: 20 * (300 + 784) MACs and weights; the lecture's storage and rate.
    layer = nn.Linear(784, 300)
    spectrum = layer_spectra(nn.Sequential(layer), torch.randn(1, 784))["0"]
    assert spectrum.dense_macs == 784 * 300 and spectrum.macs(20) == 20 * (300 + 784)
    assert storage(300, 784, 20) == 300 * 20 + 20 + 20 * 784
    assert compression_rate(300, 784, 20) == pytest.approx(300 * 784 / (20 * 1085))
    # Conv 3->8, 3x3, 10x10 output (padding 1): dense 8*3*9*100; zhang rank 2: 2*27*100 + 8*2*100.
    conv = nn.Conv2d(3, 8, 3, padding=1)
    zhang = layer_spectra(nn.Sequential(conv), torch.randn(1, 3, 10, 10), "zhang")["0"]
    assert zhang.dense_macs == 8 * 27 * 100 and zhang.macs(2) == 2 * 27 * 100 + 8 * 2 * 100
    # tai rank 2: vertical 3x1 conv 3->2 on 10x10 (2*9*100), horizontal 1x3 conv 2->8 (8*6*100).
    tai = layer_spectra(nn.Sequential(conv), torch.randn(1, 3, 10, 10), "tai")["0"]
    assert tai.macs(2) == 2 * 9 * 100 + 8 * 6 * 100
    # A rank that saves nothing is the dense layer.
    assert zhang.macs(8) == zhang.dense_macs


def noise_loader(seed: int = 0) -> torch.utils.data.DataLoader:
    """Random inputs and labels: enough to exercise the relaxation's budget logic."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(64, 3, 9, 16, generator=generator)
    labels = torch.randint(0, 10, (64,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=16)


@pytest.mark.parametrize("method", ["cptv", "pos", "relaxed"])
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.6, 0.7])
def test_every_method_respects_the_budget(net_and_input, method, budget):
    from deepshrink.prune.statistics import _multiply_accumulates

    model, inputs = net_and_input
    spectra = layer_spectra(model, inputs, "zhang")
    if method == "relaxed":
        choice = select_relaxed(model, spectra, budget, noise_loader(), RelaxedOptions(steps=20))
    else:
        choice = {"cptv": select_cptv, "pos": select_pos}[method](spectra, budget)
    assert choice.macs <= budget * choice.dense_macs
    factored = factorize(copy.deepcopy(model), spectra, choice.ranks, choice.components)
    assert sum(_multiply_accumulates(factored, inputs).values()) == choice.macs
    assert parameter_count(factored) <= parameter_count(model)


def test_relaxed_choice_has_the_lowest_loss_of_its_candidates(net_and_input):
    """The rounded relaxation competes with POS and CPTV on the training loss; it returns the best."""
    model, inputs = net_and_input
    spectra = layer_spectra(model, inputs, "zhang")
    loader = noise_loader()
    choice = select_relaxed(
        model, spectra, 0.5, loader, RelaxedOptions(steps=30, rounding_points=3, evaluation_batches=2)
    )
    candidates = choice.candidates
    assert {"POS", "CPTV"} <= {entry["candidate"] for entry in candidates} and len(candidates) == 5
    # "both": POS, CPTV, and three roundings from each of the two descents, Euclidean first.
    both = select_relaxed(model, spectra, 0.5, loader, RelaxedOptions(steps=30, rounding_points=3, projection="both"))
    assert [entry["candidate"] for entry in both.candidates][2:] == [
        *(f"relaxation step {step}" for step in (10, 20, 30)),
        *(f"relaxation (cost metric) step {step}" for step in (10, 20, 30)),
    ]
    assert choice.winner in {entry["candidate"] for entry in candidates}
    winner = min(candidates, key=lambda entry: entry["loss"])
    assert choice.ranks == winner["ranks"]

    # The recorded losses are the real losses of the factorized networks on the first two batches.
    batches = list(loader)[:2]
    for entry in candidates:
        if entry["candidate"] in ("POS", "CPTV"):
            factored = factorize(copy.deepcopy(model), spectra, entry["ranks"])
            with torch.no_grad():
                loss = sum(float(nn.functional.cross_entropy(factored(x), y)) for x, y in batches) / 2
            assert loss == pytest.approx(entry["loss"], rel=1e-4)


def test_relaxed_scored_on_validation_after_finetuning(net_and_input):
    """With a validation loader, each candidate is fine-tuned once per selection seed on that seed's
    loader and scored by its mean validation accuracy; the highest wins, ties going to the lower
    mean loss."""
    from deepshrink.train import TrainConfig, evaluate, fit

    model, inputs = net_and_input
    spectra = layer_spectra(model, inputs, "zhang")
    loader, validation = noise_loader(), noise_loader(seed=1)
    finetune = TrainConfig(epochs=1, learning_rate=0.02)
    original = copy.deepcopy(model.state_dict())
    choice = select_relaxed(
        model,
        spectra,
        0.5,
        loader,
        RelaxedOptions(
            steps=30,
            rounding_points=3,
            selection=Selection(
                validation=validation, finetune=finetune, loaders=lambda seed: noise_loader(seed=seed), seeds=(2, 3)
            ),
        ),
    )
    assert choice.criterion == "mean validation top-1 accuracy after fine-tuning with seeds [2, 3]"
    candidates = choice.candidates
    best = max(entry["metric"] for entry in candidates)
    tied = [entry for entry in candidates if entry["metric"] == best]
    assert choice.ranks == min(tied, key=lambda entry: entry["loss"])["ranks"]
    # The recorded scores are the means over the seeds of the factorized network's validation
    # accuracy and loss after fine-tuning on that seed's loader (not on the masks' loader).
    for entry in candidates:
        if entry["candidate"] in ("POS", "CPTV"):
            results = []
            for seed in (2, 3):
                factored = factorize(copy.deepcopy(model), spectra, entry["ranks"])
                fit(factored, noise_loader(seed=seed), finetune, progress=False)
                results.append(evaluate(factored, validation))
            assert entry["metric_per_seed"] == [result.metric for result in results]
            assert entry["metric"] == pytest.approx(sum(result.metric for result in results) / 2, abs=1e-12)
            assert entry["loss"] == pytest.approx(sum(result.loss for result in results) / 2, rel=1e-5)
            other = factorize(copy.deepcopy(model), spectra, entry["ranks"])
            fit(other, loader, finetune, progress=False)
            assert evaluate(other, validation).loss != pytest.approx(entry["loss"], rel=1e-5)
    # Fine-tuning the candidates leaves the model handed in untouched.
    assert all(torch.equal(tensor, original[name]) for name, tensor in model.state_dict().items())


def test_relaxed_fine_tunes_candidates_with_the_given_loss(net_and_input):
    """A selection criterion replaces cross-entropy in the candidates' fine-tuning, and the scores
    are those of that fine-tuning."""
    from deepshrink.train import TrainConfig, evaluate, fit

    model, inputs = net_and_input
    spectra = layer_spectra(model, inputs, "zhang")
    calls = []

    def smoothed(outputs, targets, batch_inputs):
        calls.append(len(batch_inputs))
        return nn.functional.cross_entropy(outputs, targets, label_smoothing=0.5)

    finetune = TrainConfig(epochs=1, learning_rate=0.05)
    validation = noise_loader(seed=1)
    choice = select_relaxed(
        model,
        spectra,
        0.5,
        noise_loader(),
        RelaxedOptions(
            steps=4,
            rounding_points=1,
            selection=Selection(validation=validation, finetune=finetune, criterion=smoothed),
        ),
    )
    assert calls and all(size == 16 for size in calls)
    entry = next(entry for entry in choice.candidates if entry["candidate"] == "CPTV")
    expected = factorize(copy.deepcopy(model), spectra, entry["ranks"])
    fit(expected, noise_loader(), finetune, criterion=smoothed, progress=False)
    assert entry["loss"] == pytest.approx(evaluate(expected, validation).loss, rel=1e-5)
    plain = factorize(copy.deepcopy(model), spectra, entry["ranks"])
    fit(plain, noise_loader(), finetune, progress=False)
    assert entry["loss"] != pytest.approx(evaluate(plain, validation).loss, rel=1e-5)


def test_relaxed_needs_a_loader_per_seed():
    """Several selection seeds with no way to reshuffle would fine-tune on one loader's running
    shuffle, unpaired across candidates; that is refused, as is an empty list of seeds."""
    with pytest.raises(ConfigError, match="loaders is not given"):
        Selection(validation=noise_loader(seed=1), seeds=(1, 2))
    with pytest.raises(ConfigError, match="selection seeds is empty"):
        Selection(validation=noise_loader(seed=1), seeds=())


def test_relaxed_rejects_zero_steps():
    with pytest.raises(ConfigError, match="steps=0"):
        RelaxedOptions(steps=0)


def test_pos_keeps_more_energy_product_than_cptv(net_and_input):
    """POS maximises the product of kept energies; at an equal budget it is at least CPTV's."""
    import math

    model, inputs = net_and_input
    spectra = layer_spectra(model, inputs, "zhang")

    def log_energy(ranks):
        total = 0.0
        for name, rank in ranks.items():
            energy = spectra[name].energy
            total += math.log(energy.sum() if rank is None else energy[:rank].sum())
        return total

    for budget in (0.4, 0.6):
        assert log_energy(select_pos(spectra, budget).ranks) >= log_energy(select_cptv(spectra, budget).ranks) - 1e-9


def test_bad_budgets_and_schemes_are_clear_errors(net_and_input):
    model, inputs = net_and_input
    with pytest.raises(ConfigError, match="budget=1.5"):
        select_cptv(layer_spectra(model, inputs), 1.5)
    with pytest.raises(ConfigError, match="scheme='svd'"):
        layer_spectra(model, inputs, "svd")


@pytest.mark.parametrize("metric", ["cost", "euclidean"])
def test_projection_onto_the_budget_matches_scipy(metric):
    """_project is the nearest point of {0 <= m <= 1, c . m <= B} in its metric, as SLSQP finds it."""
    from scipy.optimize import minimize

    from deepshrink.lowrank.relaxed import _project

    generator = torch.Generator().manual_seed(3)
    masks = torch.rand(12, generator=generator, dtype=torch.float64) * 1.6 - 0.3
    costs = torch.rand(12, generator=generator, dtype=torch.float64) * 9 + 1
    limit = 0.4 * float(costs.sum())
    projected = _project(masks, costs, limit, metric)
    weights = costs.numpy() if metric == "cost" else np.ones(12)
    reference = minimize(
        lambda point: float(weights @ (point - masks.numpy()) ** 2),
        x0=np.full(12, 0.1),
        jac=lambda point: 2 * weights * (point - masks.numpy()),
        bounds=[(0, 1)] * 12,
        constraints=[{"type": "ineq", "fun": lambda point: limit - costs.numpy() @ point}],
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 500},
    )
    assert reference.success
    np.testing.assert_allclose(projected.numpy(), reference.x, atol=1e-5)
    assert float(costs @ projected) <= limit * (1 + 1e-9)
    # The two metrics differ: a component's mask falls by the same amount in the cost metric
    # (where it stays inside (0, 1)), and in proportion to its cost in the Euclidean one.
    inside = (projected > 1e-9) & (projected < 1 - 1e-9) & (masks > 0) & (masks < 1)
    shifts = (masks - projected)[inside] / (1 if metric == "cost" else costs[inside])
    assert inside.sum() >= 2 and torch.allclose(shifts, shifts[0].expand_as(shifts), atol=1e-6)


def test_relaxed_rejects_an_unknown_projection():
    with pytest.raises(ConfigError, match="projection='l1' should be one of euclidean, cost, both"):
        RelaxedOptions(projection="l1")


class _TokenEncoder(nn.Module):
    """A transformer encoder over token ids: MultiheadAttention reads its out_proj's weight as a
    tensor, and the encoder layer's fast path (eval mode, no gradients) reads linear1's and
    linear2's, so none of them may be factored; the head may."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.hidden = nn.Linear(16, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, tokens):
        return self.head(torch.relu(self.hidden(self.encoder(self.embed(tokens)).mean(1))))


def test_layers_whose_weights_attention_reads_as_tensors_are_not_factored(tmp_path):
    import deepshrink

    torch.manual_seed(0)
    generator = np.random.default_rng(0)
    tokens = generator.integers(0, 20, (300, 8))
    data = deepshrink.load_arrays({"x": tokens, "y": tokens[:, 0] % 3}, validation=60)
    model = _TokenEncoder()
    spectra = layer_spectra(model, torch.as_tensor(tokens[:2]))
    assert sorted(spectra) == ["head", "hidden"]
    recipe = {"lowrank": {"budget": 0.5, "finetune_epochs": 1}}
    result = deepshrink.run(model, recipe, data, run_dir=tmp_path / "run", progress=False)
    structure = result.stages[0].result.structure
    assert set(structure["ranks"]) <= {"head", "hidden"} and structure["ranks"]
    decoded, _ = deepshrink.load_compressed(result.path, _TokenEncoder())
    with torch.no_grad():  # eval mode without gradients: the encoder layer's fast path
        assert decoded.eval()(torch.as_tensor(tokens[:4])).shape == (4, 3)


def test_the_figure_6_sweep_skips_an_svd_budget_the_factorable_layers_cannot_meet():
    """Most of a transformer's arithmetic is in attention, which is not factored: a 5% budget
    is out of reach. It is listed as skipped, and the sweep's other points are drawn."""
    import deepshrink
    from deepshrink.recipe import EncodeSettings, TradeoffSettings
    from deepshrink.stages import Loaders
    from deepshrink.tradeoff import tradeoff_curves

    torch.manual_seed(0)
    tokens = np.random.default_rng(0).integers(0, 20, (200, 8))
    data = deepshrink.load_arrays({"x": tokens, "y": tokens[:, 0] % 3}, validation=40)
    settings = TradeoffSettings(sparsities=[0.5], bits=[4], svd_budgets=[0.05, 0.9], retrain_epochs=0)
    curves = tradeoff_curves(_TokenEncoder(), settings, EncodeSettings(), Loaders.from_splits(data), progress=False)
    assert [(point["method"], point["setting"]) for point in curves["skipped"]] == [("SVD", "5% of the MACs")]
    assert "cannot be met" in curves["skipped"][0]["reason"]
    assert {point["method"] for point in curves["points"]} >= {"pruning only", "quantization only", "SVD"}


class _ConvBatchNormNet(nn.Module):
    """A ResNet-like stem and a MobileNet-like depthwise convolution, each followed by BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn_depthwise = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, images):
        hidden = torch.relu(self.bn(self.conv(images)))
        hidden = torch.relu(self.bn_depthwise(self.depthwise(hidden)))
        return self.head(hidden.mean((2, 3)))


def test_a_factored_convolution_with_batchnorm_folded_into_it_loads_from_its_file(tmp_path):
    """Low-rank factors `conv` into `conv.0`, `conv.1` before BatchNorm is folded into `conv.1`:
    a fresh model takes the structure, then the folding (the file would not load into one
    before). The depthwise convolution is left out of the choice, unless named (a
    MobileNet's lowrank stage was refused for it)."""
    import deepshrink

    generator = np.random.default_rng(0)
    images = generator.normal(size=(240, 3, 8, 8)).astype(np.float32)
    data = deepshrink.load_arrays({"x": images, "y": (images[:, 0].mean((1, 2)) > 0).astype(np.int64)}, validation=60)
    torch.manual_seed(0)
    model = _ConvBatchNormNet()
    with torch.no_grad():  # statistics of its own, so that folding changes the weights
        model.train()(torch.as_tensor(images[:64]))
    recipe = {"lowrank": {"budget": 0.7, "finetune_epochs": 1}, "quantize": {"bits": {"*": 6}}}
    result = deepshrink.run(model.eval(), recipe, data, run_dir=tmp_path / "run", progress=False)
    assert set(result.stages[0].result.structure["ranks"]) == {"conv"}
    decoded, metadata = deepshrink.load_compressed(result.path, _ConvBatchNormNet())
    assert ["conv.1", "bn"] in metadata["batchnorm_folded"]
    assert isinstance(decoded.bn, nn.Identity) and isinstance(decoded.conv, nn.Sequential)
    loader = deepshrink.make_loader(data.validation, 60, shuffle=False)
    assert deepshrink.evaluate(decoded, loader).metric == result.compressed_metric
    example = torch.as_tensor(images[:2])
    assert sorted(layer_spectra(model, example)) == ["conv", "head"]
    with pytest.raises(deepshrink.UnsupportedLayerError, match="groups=1"):
        layer_spectra(model, example, layers=["depthwise"])
