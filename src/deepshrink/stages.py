"""One compression stage at a time, applied in place to a model from its recipe settings.

The `prune`, `quantize` and `run` commands and `deepshrink.pipeline.compress` all go through
these functions, so a stage behaves the same whichever way it is called. Each returns a log of
what it did (plain data, for reports and checkpoint metadata).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from deepshrink.data import DataSplits, make_loader
from deepshrink.recipe import LowrankSettings, PruneSettings, QuantizeSettings
from deepshrink.train import TrainConfig, evaluate, fit, resolve_device


@dataclass(frozen=True)
class Loaders:
    """The data a stage sees. `train` is a factory so that each stage can draw its own batch
    size and shuffling seed; a user's fixed DataLoader is wrapped with `Loaders.fixed`."""

    train: object  # callable (batch_size, seed) -> DataLoader
    validation: DataLoader
    test: DataLoader

    @classmethod
    def from_splits(cls, data: DataSplits, test_subset: int | None = None) -> Loaders:
        test = data.test
        if test_subset is not None:
            test = torch.utils.data.TensorDataset(*(tensor[:test_subset] for tensor in data.test.tensors))
        return cls(
            train=lambda batch_size, seed: make_loader(data.train, batch_size, shuffle=True, seed=seed),
            validation=make_loader(data.validation, 1000, shuffle=False),
            test=make_loader(test, 1000, shuffle=False),
        )

    @classmethod
    def fixed(cls, train: DataLoader, validation: DataLoader, test: DataLoader) -> Loaders:
        """Your own loaders; the stages' batch_size settings then do not apply."""
        return cls(train=lambda batch_size, seed: train, validation=validation, test=test)


def _criterion(distill, teacher: nn.Module | None, model: nn.Module):
    """The retraining loss: cross-entropy, or distillation from `teacher` (default: the model as it
    enters the stage) when the stage's settings ask for it."""
    if distill is None:
        return None
    from deepshrink.distill import DistillationLoss

    return DistillationLoss(
        copy.deepcopy(teacher if teacher is not None else model), distill.temperature, distill.alpha
    )


def _training(settings, seed: int, epochs: int, learning_rate: float | None = None, **extra) -> TrainConfig:
    """A stage's retraining config from its settings (epochs, learning rate, decay, batch size)."""
    return TrainConfig(
        epochs=epochs,
        learning_rate=settings.learning_rate if learning_rate is None else learning_rate,
        weight_decay=settings.weight_decay,
        batch_size=settings.batch_size,
        seed=seed,
        **extra,
    )


def lowrank(
    model: nn.Module,
    settings: LowrankSettings,
    loaders: Loaders,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    teacher: nn.Module | None = None,
) -> dict:
    """Stage 0 in place: factorize at ranks chosen under the MAC budget, then fine-tune.

    The log's "structure" lets checkpoint.load_state_into and load_compressed rebuild the
    factored architecture.
    """
    from deepshrink.lowrank import factorize, layer_spectra, select_cptv, select_pos, select_relaxed, structure_of

    device = resolve_device(device)
    model.to(device)
    criterion = _criterion(settings.distill, teacher, model)
    example = next(iter(loaders.validation))[0][:1].to(device)
    spectra = layer_spectra(model, example, settings.scheme)
    if settings.method == "cptv":
        choice = select_cptv(spectra, settings.budget)
    elif settings.method == "pos":
        choice = select_pos(spectra, settings.budget)
    else:
        selection = {}
        epochs = settings.finetune_epochs if settings.selection_epochs is None else settings.selection_epochs
        if epochs:
            selection = {
                "validation": loaders.validation,
                "finetune": _training(settings, seed, epochs),
                # The final fine-tuning's batch size, shuffled differently; the same shuffles for every candidate.
                "finetune_loaders": lambda selection_seed: loaders.train(settings.batch_size, selection_seed),
                "selection_seeds": range(seed + 1, seed + 1 + settings.selection_seeds),
                # Scored after the fine-tuning the winner will get, distillation included.
                "finetune_criterion": criterion,
            }
        choice = select_relaxed(
            model,
            spectra,
            settings.budget,
            loaders.train(256, seed + 1),
            projection=settings.projection,
            device=device,
            progress=progress,
            **selection,
        )
    factorize(model, spectra, choice.ranks, choice.extra.get("components"))
    log: dict = {
        "method": settings.method,
        "ranks": choice.ranks,
        "mac_fraction": choice.mac_fraction,
        "candidates": choice.extra.get("candidates"),
        "structure": structure_of(choice.ranks, settings.scheme),
        "validation_accuracy_after_factorizing": evaluate(model, loaders.validation, device).accuracy,
    }
    if settings.finetune_epochs:
        fit(
            model,
            loaders.train(settings.batch_size, seed),
            _training(settings, seed, settings.finetune_epochs),
            device=device,
            criterion=criterion,
            progress=progress,
            description="fine-tune factors",
        )
    log["validation_accuracy"] = evaluate(model, loaders.validation, device).accuracy
    return log


def prune(
    model: nn.Module,
    settings: PruneSettings,
    loaders: Loaders,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    teacher: nn.Module | None = None,
) -> dict:
    """Stage 1 in place: magnitude pruning in rounds with retraining, or Dynamic Network Surgery."""
    from deepshrink.prune.schedule import (
        global_sparsity_rule,
        iterative_pruning,
        per_layer_sparsity_rule,
        std_quality_rule,
    )
    from deepshrink.prune.surgery import dynamic_network_surgery

    retrain = _training(settings, seed, settings.retrain_epochs)
    train_loader = loaders.train(settings.batch_size, seed)
    criterion = _criterion(settings.distill, teacher, model)
    log: dict = {"method": settings.method}
    if settings.method == "dns":
        result = dynamic_network_surgery(
            model,
            train_loader,
            retrain,
            crates=settings.quality,
            sparsities=settings.sparsity,
            validation_loader=loaders.validation,
            device=device,
            criterion=criterion,
            progress=progress,
        )
        log.update(spliced=result.spliced, thresholds=result.thresholds)
    else:
        if settings.sparsity is not None:
            rule = per_layer_sparsity_rule(settings.sparsity)
        elif settings.quality is not None:
            rule = std_quality_rule(settings.quality)
        else:
            rule = global_sparsity_rule(settings.global_sparsity, settings.layers)
        history = iterative_pruning(
            model,
            train_loader,
            loaders.validation,
            rule,
            rounds=settings.rounds,
            retrain=retrain,
            device=device,
            criterion=criterion,
            progress=progress,
        )
        log["rounds"] = [vars(record) for record in history.rounds]
    if settings.finetune_epochs:
        fit(
            model,
            train_loader,
            _training(settings, seed, settings.finetune_epochs, settings.learning_rate / 2),
            device=device,
            criterion=criterion,
            progress=progress,
            description="fine-tune (masks fixed)",
        )
    log["validation_accuracy"] = evaluate(model, loaders.validation, device).accuracy
    return log


def quantize(
    model: nn.Module,
    settings: QuantizeSettings,
    loaders: Loaders,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    teacher: nn.Module | None = None,
) -> tuple[dict, dict]:
    """Stage 2 in place: k-means weight sharing, then centroid fine-tuning.

    Returns the per-layer SharingRecords (for Figure 4) and a log.
    """
    from deepshrink.quantize.shared import share_weights

    criterion = _criterion(settings.distill, teacher, model)
    records = share_weights(model, settings.bits, settings.init, seed=seed)
    log: dict = {
        "init": settings.init,
        "bits": {name: record.bits for name, record in records.items()},
        "validation_accuracy_after_sharing": evaluate(model, loaders.validation, device).accuracy,
    }
    if settings.finetune_epochs:
        history = fit(
            model,
            loaders.train(settings.batch_size, seed),
            _training(settings, seed, settings.finetune_epochs, optimizer=settings.optimizer),
            validation_loader=loaders.validation,
            device=device,
            criterion=criterion,
            progress=progress,
            description="fine-tune centroids",
        )
        log["epochs"] = [vars(record) for record in history.epochs]
    log["validation_accuracy"] = evaluate(model, loaders.validation, device).accuracy
    return records, log
