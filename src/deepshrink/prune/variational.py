"""Sparse variational dropout (Molchanov, Ashukha & Vetrov, ICML 2017): pruning learned from data.

Each weight w = theta (1 + sqrt(alpha) eps) gets its own dropout rate alpha, trained with the
weights to maximise the evidence lower bound under a log-uniform prior: the task's loss plus, per
training example, KL(q(w) || p(w)) / N. The KL pushes alpha up wherever the loss allows it, and
a weight with log alpha > 3 (alpha > 20: noise twenty times its own size) carries no signal and
is pruned. The result is an ordinary pruning mask, which the quantize and encode stages take as
they take a magnitude mask.

As in the paper:
- the additive reparameterization: theta and log sigma^2 are the parameters (sigma^2 = alpha
  theta^2), so the gradient of theta carries no multiplicative noise and alpha can grow large;
- the local reparameterization trick for Linear and convolution layers: the noise is drawn on
  the layer's outputs, N(x theta^T, x^2 sigma^2^T), independently per example, which has lower
  variance than one weight sample per batch; every other compressible weight (recurrent,
  embedding, transposed convolution, and the Linears inside attention, whose weights torch
  reads without calling them) draws its weights once per forward pass;
- the KL approximation -KL ~ k1 sigmoid(k2 + k3 log alpha) - 0.5 log(1 + 1/alpha) - k1, with
  k1 = 0.63576, k2 = 1.87320, k3 = 1.48695, accurate to about 0.01 over all alpha;
- log alpha clipped to [-8, 8] when it is read, log sigma^2 starting at -10 (alpha ~ 0);
- Adam, and the KL's weight rising linearly from 0 over the first epochs (warm-up), so that the
  network first fits the data at its own scale.
Starting from a trained model, as a compression stage does, a few epochs reach most of the
sparsity that training from scratch reaches in hundreds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional
from torch.nn.modules.conv import _ConvNd

from deepshrink.errors import ConfigError
from deepshrink.layers import Weight, called_by_its_parents, select_weights
from deepshrink.prune.module import prune_weight, pruning_mask_of
from deepshrink.train import History, RegularizedLoss, TrainConfig, fit, training_set_size

K1, K2, K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_LIMIT = 8.0
INITIAL_LOG_SIGMA2 = -10.0
DEFAULT_THRESHOLD = 3.0
# Added to an output's variance before its square root, so that the gradient stays finite (as
# the paper's code does).
VARIANCE_FLOOR = 1e-8


def negative_kl(log_alpha: torch.Tensor) -> torch.Tensor:
    """-KL(q(w | theta, alpha) || p(w)) per weight, the paper's approximation (eq. 14).

    Args:
        log_alpha: log alpha of each weight.

    Returns:
        The approximation, the shape of `log_alpha`, up to a constant (the log-uniform prior is
        improper): 0 as alpha grows without bound, negative elsewhere.
    """
    return K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * functional.softplus(-log_alpha) - K1


class VariationalWeight(nn.Module):
    """The parametrization: a log sigma^2 per weight beside the weight theta itself.

    Training, it returns theta plus Gaussian noise of variance sigma^2 (a fresh draw per
    forward pass) or, where the local reparameterization trick draws the noise on the layer's
    outputs instead, theta alone. In eval mode it returns the weight the mask will leave: theta
    where log alpha is below the threshold, zero elsewhere.
    """

    def __init__(self, theta: torch.Tensor, threshold: float, on_outputs: bool) -> None:
        super().__init__()
        self.log_sigma2 = nn.Parameter(torch.full_like(theta.detach(), INITIAL_LOG_SIGMA2))
        self.threshold = threshold
        self.on_outputs = on_outputs

    def log_alpha(self, theta: torch.Tensor) -> torch.Tensor:
        """log alpha = log sigma^2 - log theta^2, clipped to [-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT].

        Args:
            theta: the weight's mean.

        Returns:
            log alpha, the weight's shape.
        """
        return (self.log_sigma2 - torch.log(theta * theta + 1e-8)).clamp(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        """The weight the layer computes with.

        Args:
            theta: the weight's mean, the layer's own parameter.

        Returns:
            A noisy sample, theta (noise on the outputs), or the thresholded theta (eval mode).
        """
        if not self.training:
            return theta * (self.log_alpha(theta) < self.threshold)
        if self.on_outputs:
            return theta
        return theta + torch.exp(0.5 * self.log_sigma2) * torch.randn_like(theta)


def _output_noise(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of the local reparameterization trick: the layer computed x theta^T; add
    N(0, x^2 sigma^2^T) noise, drawn per output (so per example)."""
    variational = next(item for item in module.parametrizations.weight if isinstance(item, VariationalWeight))
    if not variational.training:
        return output
    squared = inputs[0] * inputs[0]
    variance_weight = torch.exp(variational.log_sigma2)
    if isinstance(module, nn.Linear):
        variance = functional.linear(squared, variance_weight)
    else:
        variance = module._conv_forward(squared, variance_weight, None)
    return output + torch.sqrt(variance + VARIANCE_FLOOR) * torch.randn_like(output)


def _takes_output_noise(model: nn.Module, module_name: str, module: nn.Module) -> bool:
    """A Linear or (non-transposed) convolution that runs its own forward, so that the
    output-noise hook on its weight sees every call (inside attention, torch reads the weight itself)."""
    return (
        isinstance(module, nn.Linear) or (isinstance(module, _ConvNd) and not module.transposed)
    ) and called_by_its_parents(model, module_name)


@dataclass
class VariationalState:
    """The weights under variational dropout, their parametrizations and the hooks to remove."""

    weights: dict[str, Weight]
    parametrizations: dict[str, VariationalWeight]
    hooks: list = field(default_factory=list)

    def kl(self) -> torch.Tensor:
        """KL(q || p) summed over every weight, up to the prior's constant.

        Returns:
            A scalar tensor, with gradients to theta and log sigma^2.
        """
        total = None
        for name, parametrization in self.parametrizations.items():
            theta = self.weights[name].original()
            part = -negative_kl(parametrization.log_alpha(theta)).sum()
            total = part if total is None else total + part
        return total

    def masks(self) -> dict[str, torch.Tensor]:
        """The keep-masks: log alpha below each weight's threshold.

        Returns:
            {weight name: bool mask}.
        """
        with torch.no_grad():
            return {
                name: parametrization.log_alpha(self.weights[name].original()) < parametrization.threshold
                for name, parametrization in self.parametrizations.items()
            }

    def posterior_std(self) -> dict[str, float]:
        """Each weight tensor's mean posterior standard deviation, sigma = exp(log sigma^2 / 2),
        over the weights its mask keeps: how finely the data pins those weights down
        (`posterior_resolution` sets it against the weights' span for a codebook width).

        Returns:
            {weight name: mean sigma of the kept weights}; a tensor with nothing kept is left out.
        """
        masks = self.masks()
        with torch.no_grad():
            return {
                name: float(torch.exp(0.5 * parametrization.log_sigma2[masks[name]]).double().mean())
                for name, parametrization in self.parametrizations.items()
                if bool(masks[name].any())
            }


def start_variational(
    model: nn.Module, layers: Iterable[str] | None = None, threshold: float = DEFAULT_THRESHOLD
) -> VariationalState:
    """Put the chosen weights of `model` under variational dropout.

    Args:
        model: the model, changed in place (parametrizations and, on Linear and convolution
            layers, forward hooks).
        layers: globs of the weights (default: every compressible weight).
        threshold: the log alpha above which a weight is pruned.

    Returns:
        The VariationalState, for the loss (`kl`), the masks and `finish_variational`.

    Raises:
        ConfigError: a chosen weight is already pruned or shared, or the threshold is not finite.
    """
    if not math.isfinite(threshold):
        raise ConfigError(f"log_alpha_threshold={threshold!r} should be a finite number, e.g. 3 (the paper's)")
    weights = select_weights(model, None if layers is None else list(layers))
    busy = [name for name, weight in weights.items() if weight.parametrizations()]
    if busy:
        raise ConfigError(
            f"variational dropout starts from plain weights; {', '.join(busy)} are already pruned or shared: "
            "run it on the trained model, before other pruning and before sharing"
        )
    state = VariationalState(weights, {})
    for name, weight in weights.items():
        # A tied weight takes its noise on the outputs only where every holder can.
        holders = [(weight.module_name, weight.module)]
        holders += [(alias.module_name, alias.module) for alias in weight.aliases]
        on_outputs = weight.tensor == "weight" and all(
            _takes_output_noise(model, module_name, module) for module_name, module in holders
        )
        parametrization = VariationalWeight(weight.original(), threshold, on_outputs)
        weight.register(parametrization)
        state.parametrizations[name] = parametrization
        if on_outputs:
            state.hooks += [module.register_forward_hook(_output_noise) for _, module in holders]
    return state


def finish_variational(state: VariationalState) -> dict[str, torch.Tensor]:
    """Replace variational dropout by ordinary pruning masks (log alpha below the threshold).

    Args:
        state: from start_variational.

    Returns:
        {weight name: keep-mask}, as applied.
    """
    masks = state.masks()
    _remove(state)
    for name, weight in state.weights.items():
        prune_weight(weight, masks[name])
    return masks


def _remove(state: VariationalState) -> None:
    """Take the hooks and parametrizations off, leaving each weight's theta as it is."""
    for hook in state.hooks:
        hook.remove()
    state.hooks.clear()
    for weight in state.weights.values():
        weight.remove_parametrizations(leave_parametrized=False)


def posterior_resolution(model: nn.Module, posterior_std: dict[str, float]) -> dict[str, dict[str, float]]:
    """The posterior's resolution of each weight tensor as the model now stands: the kept
    weights' span (max - min) beside their mean posterior standard deviation. Taken where
    pruning ends, before BatchNorm folding rescales channels, so that the two are in the same
    units; `quantize.shared.posterior_bits` turns span / sigma into a codebook width.

    Args:
        model: the pruned model (its weights under pruning masks, or plain).
        posterior_std: {weight name: mean sigma of its kept weights} (`VariationalResult`).

    Returns:
        {weight name: {"sigma": ..., "span": ...}} for the tensors with a posterior and at least
        one kept weight.
    """
    resolution = {}
    weights = select_weights(model, None)
    for name, sigma in posterior_std.items():
        weight = weights.get(name)
        if weight is None:
            continue
        mask = pruning_mask_of(weight)
        values = weight.value.detach()
        kept = values[mask.mask] if mask is not None else values[values != 0]
        if kept.numel():
            resolution[name] = {"sigma": float(sigma), "span": float(kept.max() - kept.min())}
    return resolution


@dataclass
class VariationalResult:
    """What variational dropout did: its training history, the masks it left and the kept
    weights' mean posterior standard deviation per weight tensor."""

    history: History
    masks: dict[str, torch.Tensor]
    kept_fraction: float
    posterior_std: dict[str, float] = field(default_factory=dict)


def variational_dropout(
    model: nn.Module,
    train_loader,
    config: TrainConfig,
    *,
    layers: Iterable[str] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    kl_weight: float = 1.0,
    warmup_epochs: float | None = None,
    validation_loader=None,
    device: str | torch.device = "cpu",
    task=None,
    criterion=None,
    progress: bool = True,
) -> VariationalResult:
    """Train `model` with sparse variational dropout on the chosen weights, then prune each
    weight whose log alpha ends above `threshold`.

    Args:
        model: the trained model, changed in place.
        train_loader: the training batches; its data set's size is N of the ELBO.
        config: the training (epochs, learning rate, schedule, seed); Adam, without weight decay
            (the KL is the regulariser).
        layers: globs of the weights (default: every compressible weight).
        threshold: the log alpha above which a weight is pruned (the paper's 3).
        kl_weight: the KL's weight in the ELBO (1: the true bound; more prunes more).
        warmup_epochs: epochs over which the KL's weight rises from 0 (default: half of them).
        validation_loader: the batches each epoch's metric is logged on (with the masks the
            thresholds would leave).
        device: where to train.
        task: the task (default classification).
        criterion: a loss in place of the task's (e.g. distillation).
        progress: progress bars.

    Returns:
        The VariationalResult: history, masks, the kept fraction of the chosen weights and
        their posterior standard deviations.

    Raises:
        ConfigError: a chosen weight is already pruned or shared, or a setting is out of range.
    """
    if not kl_weight >= 0 or not math.isfinite(kl_weight):
        raise ConfigError(f"kl_weight={kl_weight!r} should be a non-negative number, e.g. 1 (the ELBO's)")
    examples = training_set_size(train_loader, "variational dropout")
    warmup = config.epochs / 2 if warmup_epochs is None else warmup_epochs
    state = start_variational(model, layers, threshold)
    try:
        warmup_steps = round(warmup * len(train_loader))

        def scale(step: int) -> float:  # KL / N, its weight rising linearly over the warm-up
            return (min(1.0, step / warmup_steps) if warmup_steps else 1.0) * kl_weight / examples

        loss = RegularizedLoss(state.kl, scale, criterion, task)
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=config.learning_rate)
        history = fit(
            model,
            train_loader,
            config,
            validation_loader=validation_loader,
            device=device,
            task=task,
            criterion=loss,
            optimizer=optimizer,
            progress=progress,
            description="variational dropout",
        )
    except BaseException:
        _remove(state)  # an interrupted run leaves the model as plain as it came
        raise
    posterior_std = state.posterior_std()
    masks = finish_variational(state)
    kept = sum(int(mask.sum()) for mask in masks.values()) / max(sum(mask.numel() for mask in masks.values()), 1)
    return VariationalResult(history, masks, kept, posterior_std)
