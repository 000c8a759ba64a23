"""Dynamic Network Surgery (Guo, Yao & Chen, NIPS 2016).

The mask T is updated during training by h_k(w) = 0 if |w| < a_k, 1 if |w| > b_k, and left as it
is in between, so a pruned weight whose magnitude grows back past b_k is spliced back in. The
forward pass uses W * T; the backward pass sends dL/d(W*T) to every entry of W, pruned or not
(eq. 2 of the paper), so the full-precision copy keeps learning. Masks are updated after an
optimizer step with probability (1 + gamma * step) ** -power, which lets the structure settle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from deepshrink.errors import ConfigError
from deepshrink.layers import Weight, as_weight, match_per_layer, select_weights
from deepshrink.prune.module import prune_weight
from deepshrink.train import History, TrainConfig, fit

# Guo et al.'s released code sets a_k and b_k 10% either side of one threshold per layer.
THRESHOLD_MARGIN = 0.1


class _StraightThroughMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weight * mask

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        return gradient, None


class SurgeryMask(nn.Module):
    """Parametrization holding the DNS mask and the layer's two thresholds a_k < b_k."""

    def __init__(self, mask: torch.Tensor, low: float, high: float) -> None:
        super().__init__()
        if not 0 <= low <= high:
            raise ConfigError(f"thresholds low={low} and high={high} should satisfy 0 <= low <= high")
        self.register_buffer("mask", mask.to(torch.bool).clone())
        self.low = low
        self.high = high

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight with the masked entries zeroed; gradients reach every entry (straight through).

        Args:
            weight: the full-precision weight.

        Returns:
            weight x mask.
        """
        return _StraightThroughMask.apply(weight, self.mask.to(weight.dtype))

    @torch.no_grad()
    def update(self, weight: torch.Tensor) -> int:
        """Apply h_k to the full-precision weights; returns how many entries changed.

        Args:
            weight: the full-precision weight.

        Returns:
            How many mask entries changed.
        """
        magnitude = weight.abs()
        new_mask = torch.where(magnitude < self.low, False, torch.where(magnitude > self.high, True, self.mask))
        changed = int((new_mask != self.mask).sum())
        self.mask.copy_(new_mask)
        return changed


def layer_threshold(weight: torch.Tensor, crate: float | None = None, sparsity: float | None = None) -> float:
    """One threshold per layer from its weight statistics.

    With `crate` (Guo et al.): mean(|w|) + crate * std(|w|). With `sparsity`: the magnitude
    below which that fraction of the weights lies, which is easier to aim at a target.

    Args:
        weight: the weight.
        crate: the threshold in standard deviations above the mean magnitude; or
        sparsity: the fraction below the threshold.

    Returns:
        The threshold.

    Raises:
        ConfigError: both or neither of `crate` and `sparsity`, or one out of range.
    """
    magnitude = weight.detach().abs().flatten().double()
    if (crate is None) == (sparsity is None):
        raise ConfigError("give exactly one of crate (threshold = mean + crate * std) or sparsity")
    if crate is not None:
        if not math.isfinite(crate):
            raise ConfigError(f"crate={crate!r} should be a finite number, e.g. 1.0")
        return max(0.0, (magnitude.mean() + crate * magnitude.std()).item())
    if not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity={sparsity!r} should be a fraction in [0, 1)")
    return (
        torch.quantile(magnitude, sparsity).item()
        if magnitude.numel() <= 16_000_000
        else (magnitude.kthvalue(max(1, round(sparsity * magnitude.numel()))).values.item())
    )


def start_surgery(layer: Weight | nn.Module, threshold: float) -> SurgeryMask:
    """Register a SurgeryMask on the weight `layer` with a_k, b_k around `threshold`.

    Args:
        layer: a Weight or a single-weight module.
        threshold: the layer's threshold.

    Returns:
        The SurgeryMask.
    """
    layer = as_weight(layer)
    low, high = (1 - THRESHOLD_MARGIN) * threshold, (1 + THRESHOLD_MARGIN) * threshold
    surgery = SurgeryMask(layer.value.detach().abs() > threshold, low, high)
    layer.register(surgery)
    return surgery


def surgery_of(layer: Weight | nn.Module) -> SurgeryMask | None:
    """The weight's SurgeryMask parametrization, if DNS is in progress on it.

    Args:
        layer: a Weight or a single-weight module.

    Returns:
        The SurgeryMask, or None.
    """
    return next((item for item in as_weight(layer).parametrizations() if isinstance(item, SurgeryMask)), None)


def finish_surgery(layer: Weight | nn.Module) -> torch.Tensor:
    """Replace the DNS parametrization by a fixed pruning mask; returns that mask.

    Args:
        layer: a Weight or a single-weight module.

    Returns:
        The keep-mask.

    Raises:
        ConfigError: no surgery is in progress on it.
    """
    layer = as_weight(layer)
    surgery = surgery_of(layer)
    if surgery is None:
        raise ConfigError(f"{layer.name or layer.kind!r} has no surgery in progress")
    mask = surgery.mask.clone()
    layer.remove_parametrizations(leave_parametrized=False)
    prune_weight(layer, mask)
    return mask


@dataclass
class SurgeryResult:
    history: History
    masks: dict[str, torch.Tensor]
    spliced: int  # pruned entries that came back over the whole run
    thresholds: dict[str, float]


def dynamic_network_surgery(
    model: nn.Module,
    train_loader: DataLoader,
    config: TrainConfig,
    *,
    crates: Mapping[str, float] | None = None,
    sparsities: Mapping[str, float] | None = None,
    gamma: float = 1e-4,
    power: float = 1.0,
    validation_loader: DataLoader | None = None,
    device: str | torch.device = "cpu",
    task=None,
    criterion=None,
    progress: bool = True,
) -> SurgeryResult:
    """Train `model` with DNS on the layers named in `crates` or `sparsities`, then fix the masks.

    The result leaves ordinary PruningMask parametrizations, so the usual retraining, the
    quantization stage and the encoder all take it from there. `task` (default classification)
    gives the loss and the logged metric; `criterion` replaces the loss (a DistillationLoss, say).

    Args:
        model: the model, changed in place.
        train_loader: the training batches.
        config: the training (epochs, learning rate, ...).
        crates: {layer glob: crate}; or
        sparsities: {layer glob: sparsity}.
        gamma: with `power`, the probability of a mask update at step t, (1 + gamma t)^-power.
        power: see `gamma`.
        validation_loader: the batches the metric is logged on.
        device: where to train.
        task: the task.
        criterion: a loss in place of the task's.
        progress: progress bars.

    Returns:
        The SurgeryResult: history, masks, and the entries spliced back.

    Raises:
        ConfigError: both or neither of `crates` and `sparsities`, or a value out of range.
    """
    chosen = dict(crates or {}) if crates else dict(sparsities or {})
    if not chosen or (crates and sparsities):
        raise ConfigError("give per-layer thresholds as either crates or sparsities (one of them, not both)")
    layers = select_weights(model, list(chosen))
    values = match_per_layer(layers, chosen, "surgery")
    thresholds, surgeries = {}, {}
    for name, layer in layers.items():
        if crates:
            thresholds[name] = layer_threshold(layer.value, crate=values[name])
        else:
            thresholds[name] = layer_threshold(layer.value, sparsity=values[name])
        surgeries[name] = start_surgery(layer, thresholds[name])
    generator = torch.Generator().manual_seed(config.seed)
    spliced = 0

    def update_masks(trained: nn.Module, step: int) -> None:
        nonlocal spliced
        if torch.rand((), generator=generator).item() >= (1 + gamma * step) ** -power:
            return
        for name, layer in layers.items():
            before = surgeries[name].mask.clone()
            surgeries[name].update(layer.original())
            spliced += int((~before & surgeries[name].mask).sum())

    history = fit(
        model,
        train_loader,
        config,
        validation_loader=validation_loader,
        device=device,
        task=task,
        criterion=criterion,
        after_step=update_masks,
        progress=progress,
        description="surgery",
    )
    masks = {name: finish_surgery(layer) for name, layer in layers.items()}
    return SurgeryResult(history, masks, spliced, thresholds)
