"""Soft weight-sharing (Ullrich, Meeds & Welling, ICLR 2017): quantization learned with the weights.

The weights are retrained under a Gaussian-mixture prior whose parameters are learned too:
loss = task loss + tau x (-log p(w)) / N, with p(w) = prod_i sum_j pi_j N(w_i | mu_j, 1 / lambda_j).
The mixture pulls the weights into clusters while the task loss keeps them useful, so that at the
end each weight is set to the mean of its most responsible component and nothing much is lost.
Component 0 sits at zero with a fixed, large mixing proportion: the weights it takes become
exact zeros (pruned), the others share a codebook of at most J - 1 values. The result is the
same weight-sharing parametrization that k-means gives, so the encoder and the runtime take it
unchanged, and centroid fine-tuning can follow.

The loss is the task's plus tau x (-log p(w) - log p(precisions)) / N. Our choices (the paper
leaves some open):
- one mixture per weight tensor, as k-means sharing has one codebook per layer, where the paper
  has one over all layers: a shared mixture spaced over every layer's range put LeNet-300-100's
  fc1 (standard deviation 0.028) between means 0.093 apart, and its hard assignment lost 13-54
  points of accuracy; one mixture per layer lost 1.6 points before any fine-tuning
  (BENCHMARKS.md, "Soft weight-sharing, one mixture per layer");
- each initialised with its non-zero means evenly spaced over its layer's range and every
  precision from that spacing;
- the zero component starting at a tenth of the weights' spread, the others at half their
  spacing, and Gamma hyperpriors on the precisions centred there (a firm one on the zero
  component's, so that it stays narrow, and a weak one on the others, so that no component
  collapses onto one weight);
- Adam, with its own learning rate for the mixture;
- components whose means end within a fraction of their standard deviation of each other are
  merged before the weights are assigned.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deepshrink.errors import ConfigError
from deepshrink.layers import Weight, select_weights
from deepshrink.prune.module import pruning_mask_of
from deepshrink.quantize.shared import SAMPLE_SIZE, SharedWeights, SharingRecord, index_dtype
from deepshrink.train import History, RegularizedLoss, TrainConfig, fit, training_set_size

ZERO_MIXING = 0.99  # pi_0: the share of the weights the prior expects at zero
# The shapes of the Gamma hyperpriors on the precisions, each centred on its component's initial
# precision (so that they follow the weights' scale): the zero component's held firmly, so that it
# stays narrow and takes only the weights near zero; the others' loosely, so that none collapses
# onto a single weight.
ZERO_PRECISION_SHAPE = 5000.0
PRECISION_SHAPE = 25.0
MERGE_DISTANCE = 0.5  # in units of the wider component's standard deviation
CHUNK = 1 << 20  # weights assigned at a time: the (weights x components) densities stay small


class GaussianMixturePrior(nn.Module):
    """A mixture of `components` Gaussians over scalar weights; component 0 is fixed at zero with
    mixing proportion ZERO_MIXING, the others' means, precisions and proportions are learned."""

    def __init__(self, components: int, low: float, high: float, spread: float | None = None) -> None:
        super().__init__()
        if not isinstance(components, int) or components < 2:
            raise ConfigError(f"components={components!r} should be a whole number of at least 2 (zero and one more)")
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConfigError(f"the weights' range [{low}, {high}] is empty or not finite; is the model trained?")
        others = components - 1
        # Evenly spaced over the range, zero excluded (component 0 holds it).
        means = torch.linspace(low, high, others + 2, dtype=torch.float64)[1:-1] if others > 1 else None
        if means is None:
            means = torch.tensor([high if abs(high) > abs(low) else low], dtype=torch.float64)
        spacing = (high - low) / (others + 1)
        self.means = nn.Parameter(means.float())
        precisions = torch.full((components,), -2 * math.log(spacing / 2))
        if spread is not None and spread > 0:  # the zero component starts narrow: a tenth of the weights' spread
            precisions[0] = -2 * math.log(spread / 10)
        self.log_precisions = nn.Parameter(precisions)
        self.mixing_logits = nn.Parameter(torch.zeros(others))
        # Gamma(shape, rate) with mean shape / rate at the initial precision.
        shapes = torch.full((components,), PRECISION_SHAPE)
        shapes[0] = ZERO_PRECISION_SHAPE
        self.register_buffer("precision_shapes", shapes)
        self.register_buffer("precision_rates", shapes / precisions.exp())

    def mixing(self) -> torch.Tensor:
        """pi: ZERO_MIXING for component 0, the rest shared by the others' learned logits.

        Returns:
            The proportions, summing to one.
        """
        return torch.cat(
            [self.mixing_logits.new_tensor([ZERO_MIXING]), (1 - ZERO_MIXING) * self.mixing_logits.softmax(0)]
        )

    def all_means(self) -> torch.Tensor:
        """The components' means, zero first.

        Returns:
            The means.
        """
        return torch.cat([self.means.new_zeros(1), self.means])

    def log_densities(self, weights: torch.Tensor) -> torch.Tensor:
        """log pi_j + log N(w | mu_j, 1 / lambda_j) for every weight and component.

        Args:
            weights: a flat tensor of weights.

        Returns:
            (weights, components).
        """
        precisions = self.log_precisions.exp()
        difference = weights[:, None] - self.all_means()[None, :]
        return (
            torch.log(self.mixing())[None, :]
            + 0.5 * (self.log_precisions - math.log(2 * math.pi))[None, :]
            - 0.5 * precisions[None, :] * difference * difference
        )

    def negative_log_likelihood(self, weights: torch.Tensor) -> torch.Tensor:
        """-sum_i log p(w_i), differentiable in the weights and the mixture's parameters.

        Args:
            weights: a flat tensor of weights.

        Returns:
            A scalar tensor.
        """
        return -torch.logsumexp(self.log_densities(weights), dim=1).sum()

    def negative_log_hyperprior(self) -> torch.Tensor:
        """-log of the Gamma hyperpriors' densities at the precisions (up to constants).

        Returns:
            A scalar tensor.
        """
        shapes, rates = self.precision_shapes, self.precision_rates
        return -((shapes - 1) * self.log_precisions - rates * self.log_precisions.exp()).sum()

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        """The complexity term: -log p(w) - log p(precisions).

        Args:
            weights: a flat tensor of weights.

        Returns:
            A scalar tensor.
        """
        return self.negative_log_likelihood(weights) + self.negative_log_hyperprior()

    def merged(self) -> tuple[np.ndarray, np.ndarray]:
        """The components after merging those whose means lie close together.

        Returns:
            (means, group): the merged means (zero first), and for each original component the
            index of the merged one it joined.
        """
        with torch.no_grad():
            means = self.all_means().double().cpu().numpy()
            deviations = self.log_precisions.double().mul(-0.5).exp().cpu().numpy()
            weights = self.mixing().double().cpu().numpy()
        order = [0] + sorted(range(1, len(means)), key=lambda index: means[index])
        group = np.zeros(len(means), dtype=np.int64)
        merged_means, merged_weights, merged_deviation = [0.0], [weights[0]], [deviations[0]]
        for index in order[1:]:
            if abs(means[index]) < MERGE_DISTANCE * max(deviations[index], deviations[0]):
                group[index] = 0  # next to zero: the zero component takes it
                continue
            last = len(merged_means) - 1
            reach = MERGE_DISTANCE * max(deviations[index], merged_deviation[last])
            if last > 0 and abs(means[index] - merged_means[last]) < reach:
                total = merged_weights[last] + weights[index]
                merged_means[last] = (merged_means[last] * merged_weights[last] + means[index] * weights[index]) / total
                merged_weights[last] = total
                merged_deviation[last] = max(merged_deviation[last], deviations[index])
            else:
                merged_means.append(means[index])
                merged_weights.append(weights[index])
                merged_deviation.append(deviations[index])
            group[index] = len(merged_means) - 1
        return np.asarray(merged_means), group


@dataclass
class SoftSharingResult:
    """What soft weight-sharing did: the training history, per weight its mixture's merged means
    (zero first), and what sharing did to it (its codebook against the mixture's initial means,
    for Figure 4)."""

    history: History
    means: dict[str, np.ndarray]
    records: dict[str, SharingRecord]


class _WithPriors(nn.Module):
    """The model and its layers' priors as one module for `fit`: all go to its device, and under a
    process group DistributedDataParallel all-reduces the priors' gradients with the model's. (Held
    as the model's own children instead, the priors broke nn.Sequential models, which call every
    child.)"""

    def __init__(self, model: nn.Module, priors: nn.ModuleList) -> None:
        super().__init__()
        self.model = model
        self.priors = priors

    def forward(self, *inputs, **keywords):
        return self.model(*inputs, **keywords)


def soft_weight_sharing(
    model: nn.Module,
    train_loader,
    config: TrainConfig,
    *,
    layers: Iterable[str] | None = None,
    components: int = 17,
    tau: float = 5e-3,
    prior_learning_rate: float = 3e-4,
    validation_loader=None,
    device: str | torch.device = "cpu",
    task=None,
    criterion=None,
    progress: bool = True,
) -> SoftSharingResult:
    """Retrain `model` under learned Gaussian-mixture priors, one per chosen weight, then share
    each weight's values through its mixture's means (zero for the zero component).

    Args:
        model: the trained (possibly pruned) model, changed in place: the chosen weights end
            weight-shared, as `deepshrink.quantize` leaves them.
        train_loader: the training batches; its data set's size is N.
        config: the retraining (epochs, learning rate of the weights, schedule, seed); Adam.
        layers: globs of the weights (default: every compressible weight).
        components: each mixture's components, the zero one included (17: zero and 16 values,
            so at most 5 bits per weight).
        tau: the prior's weight against the task's loss.
        prior_learning_rate: Adam's learning rate for the mixture's parameters.
        validation_loader: the batches each epoch's metric is logged on (the soft weights).
        device: where to train.
        task: the task (default classification).
        criterion: a loss in place of the task's (e.g. distillation).
        progress: progress bars.

    Returns:
        The SoftSharingResult.

    Raises:
        ConfigError: a chosen weight is already shared, or a setting is out of range.
    """
    if not tau > 0 or not math.isfinite(tau):
        raise ConfigError(f"tau={tau!r} should be a positive number, e.g. 0.005")
    weights = select_weights(model, None if layers is None else list(layers))
    for name, weight in weights.items():
        if any(pruning_mask_of(weight) is not item for item in weight.parametrizations()):
            raise ConfigError(f"{name!r} is already shared or parametrized by something other than pruning")
    device_now = next((parameter.device for parameter in model.parameters()), torch.device("cpu"))
    priors = nn.ModuleList()
    with torch.no_grad():
        for weight in weights.values():
            values = weight.value.detach().reshape(-1).float()
            low, high, spread = float(values.min()), float(values.max()), float(values.std())
            priors.append(GaussianMixturePrior(components, low, high, spread).to(device_now))
    initial_means = [prior.all_means().detach().double().cpu().numpy() for prior in priors]
    examples = training_set_size(train_loader, "soft weight-sharing")

    def complexity() -> torch.Tensor:
        return sum(prior(weight.value.reshape(-1)) for prior, weight in zip(priors, weights.values(), strict=True))

    loss = RegularizedLoss(
        complexity,
        lambda step: tau / examples,  # noqa: ARG005 - the same weight at every step
        criterion,
        task,
    )
    network = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.Adam(
        [{"params": network, "lr": config.learning_rate}, {"params": priors.parameters(), "lr": prior_learning_rate}]
    )
    history = fit(
        _WithPriors(model, priors),
        train_loader,
        config,
        validation_loader=validation_loader,
        device=device,
        task=task,
        criterion=loss,
        optimizer=optimizer,
        progress=progress,
        description="soft weight-sharing",
    )
    means, records = {}, {}
    for (name, weight), prior, initial in zip(weights.items(), priors, initial_means, strict=True):
        means[name], group = prior.merged()
        records[name] = _share_by_responsibility(weight, prior, means[name], group, initial, config.seed)
    return SoftSharingResult(history, means, records)


@torch.no_grad()
def _share_by_responsibility(
    weight: Weight, prior: GaussianMixturePrior, means: np.ndarray, group: np.ndarray, initial: np.ndarray, seed: int
) -> SharingRecord:
    """Set every value of `weight` to its most responsible (merged) component's mean, as a
    weight-sharing parametrization: code 0 is zero (and a pruned weight stays there), codes
    1.. the layer's own non-zero means in ascending order."""
    values = weight.value.detach().reshape(-1)
    merged = torch.from_numpy(group).to(values.device)
    assignment = torch.cat(
        [merged[prior.log_densities(values[start : start + CHUNK]).argmax(1)] for start in range(0, len(values), CHUNK)]
    )
    assignment[values == 0] = 0
    used = torch.unique(assignment[assignment > 0])  # ascending component indices: ascending means
    lookup = torch.zeros(len(means), dtype=torch.int64, device=values.device)
    lookup[used] = torch.arange(1, len(used) + 1, device=values.device)
    codes = lookup[assignment]
    bits = max(1, math.ceil(math.log2(len(used) + 1)))
    codebook = torch.from_numpy(means[used.cpu().numpy()].astype(np.float32)).to(values.device)
    full = torch.cat([codebook.new_zeros(1), codebook])
    inertia = float(((values.double() - full[codes].double()) ** 2).sum())
    sample = values[values != 0].cpu().numpy()
    if sample.size > SAMPLE_SIZE:
        sample = np.random.default_rng(seed).choice(sample, SAMPLE_SIZE, replace=False)
    if weight.parametrizations():
        weight.remove_parametrizations()  # a pruning mask: its zeros are code 0 from now on
    weight.register(SharedWeights(codebook, codes.to(index_dtype(bits)).view(weight.value.shape), True), unsafe=True)
    return SharingRecord(bits, True, initial[1:].copy(), codebook.double().cpu().numpy(), inertia, np.sort(sample))
