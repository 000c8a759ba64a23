"""The retraining every stage shares: its loss (the task's, or distillation from a teacher) and
one fine-tuning call from a stage's settings (epochs, learning rate, decay, batch size) and the
context's task and BatchNorm handling."""

from __future__ import annotations

import copy

from torch import nn

from deepshrink.stages.base import StageContext
from deepshrink.train import EpochRecord, TrainConfig, fit


def criterion(settings, context: StageContext, model: nn.Module):
    """The retraining loss: None (the context's task loss), or distillation from `context.teacher`
    (default: the model as it enters the stage) when the settings' `distill` asks for it.

    Args:
        settings: the stage's settings (their `distill`, if any).
        context: the run's context (its task and teacher).
        model: the model entering the stage, the teacher by default.

    Returns:
        None, or a DistillationLoss.
    """
    distill = getattr(settings, "distill", None)
    if distill is None:
        return None
    from deepshrink.distill import DistillationLoss

    teacher = context.teacher if context.teacher is not None else model
    return DistillationLoss(copy.deepcopy(teacher), distill.temperature, distill.alpha, context.task, distill.mixup)


def training_config(
    settings, context: StageContext, epochs: int, learning_rate: float | None = None, **extra
) -> TrainConfig:
    """A stage's retraining config from its settings (learning rate, decay, batch size, and the
    optimizer where the stage has one) and the context's seed and BatchNorm handling.

    Args:
        settings: the stage's settings.
        context: the run's context.
        epochs: how many epochs.
        learning_rate: overrides the settings' learning rate.
        **extra: more TrainConfig fields (an `optimizer` here wins over the settings').

    Returns:
        The TrainConfig.
    """
    extra.setdefault("optimizer", getattr(settings, "optimizer", "sgd"))
    return TrainConfig(
        epochs=epochs,
        learning_rate=settings.learning_rate if learning_rate is None else learning_rate,
        weight_decay=settings.weight_decay,
        batch_size=settings.batch_size,
        seed=context.seed,
        batchnorm=context.batchnorm,
        **extra,
    )


def fine_tune(
    model: nn.Module,
    settings,
    context: StageContext,
    *,
    epochs: int,
    description: str,
    loss=None,
    learning_rate: float | None = None,
    validate: bool = False,
    loader=None,
    **extra,
) -> list[EpochRecord]:
    """Retrain `model` for `epochs` with the stage's settings and loss.

    Args:
        model: the model, changed in place.
        settings: the stage's settings (learning rate, decay, batch size).
        context: the run's context.
        epochs: how many epochs (0: nothing happens).
        description: the progress bar's label.
        loss: a loss in place of the task's (e.g. distillation).
        learning_rate: overrides the settings' learning rate.
        validate: each epoch's record carries the validation metric.
        loader: a stage's own training loader to continue (its shuffles go on where they were);
            by default a fresh one is drawn at the stage's seed.
        **extra: more TrainConfig fields.

    Returns:
        The epoch records.
    """
    if not epochs:
        return []
    history = fit(
        model,
        loader if loader is not None else context.loaders.train(settings.batch_size, context.seed),
        training_config(settings, context, epochs, learning_rate, **extra),
        validation_loader=context.loaders.validation if validate else None,
        device=context.device,
        task=context.task,
        criterion=loss,
        progress=context.progress,
        description=description,
    )
    return history.epochs
