"""Stage-agnostic training and evaluation loops.

`fit` takes ordinary DataLoaders, a model and a small config, and keeps no global state, so the
pruning, quantization and distillation stages reuse it for retraining, and it runs unchanged
under torch.distributed (wrap the model in DistributedDataParallel and give the loader a
DistributedSampler; metrics are then summed over all ranks).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as distributed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from deepshrink.errors import ConfigError
from deepshrink.progress import progress_bar

SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of SGD with momentum (or Adam), weight decay and a learning-rate schedule.

    `schedule` is one of: "cosine" (annealed to zero over all steps), "step" (x0.1 at 50% and
    75% of the epochs), "constant".
    """

    epochs: int = 10
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine"
    seed: int = 0
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ConfigError(f"epochs={self.epochs!r} should be a non-negative integer")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise ConfigError(f"learning_rate={self.learning_rate!r} should be a positive number, e.g. 0.05")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={self.momentum!r} should be in [0, 1), e.g. 0.9")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay={self.weight_decay!r} should be >= 0, e.g. 5e-4")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size!r} should be a positive integer, e.g. 128")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} should be one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r} should be one of {', '.join(OPTIMIZERS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; known options are {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float
    count: int


@dataclass
class EpochRecord:
    epoch: int
    learning_rate: float
    train_loss: float
    train_accuracy: float
    validation_accuracy: float | None
    seconds: float


@dataclass
class History:
    epochs: list[EpochRecord] = field(default_factory=list)

    @property
    def last(self) -> EpochRecord | None:
        return self.epochs[-1] if self.epochs else None


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Turn "auto", "cpu", "cuda" or "cuda:N" into a device, checking that it exists."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"device={name!r} is not a device name; use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} was asked for but CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def _schedule_factor(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    if config.schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    if config.schedule == "step":
        milestones = (total_steps // 2, (3 * total_steps) // 4)
        return lambda step: 0.1 ** sum(step >= milestone for milestone in milestones)
    return lambda step: 1.0


def _is_main_rank() -> bool:
    return not distributed.is_initialized() or distributed.get_rank() == 0


def _sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    if not distributed.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    distributed.all_reduce(tensor)
    return tensor.tolist()


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if config.optimizer == "adam":
        # Adam scales each parameter's step by its own gradient history, which suits codebooks:
        # a centroid's gradient sums those of all its weights, so its size varies by orders of
        # magnitude from layer to layer.
        return torch.optim.Adam(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        trainable, lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
    )


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    config: TrainConfig,
    *,
    validation_loader: DataLoader | None = None,
    device: str | torch.device = "cpu",
    criterion: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    after_step: Callable[[nn.Module, int], None] | None = None,
    progress: bool = True,
    description: str = "train",
) -> History:
    """Train `model` in place for `config.epochs` epochs and return the per-epoch history.

    Args:
        model: the network, moved to `device`.
        train_loader: batches of (inputs, targets).
        config: epochs, learning rate and schedule, momentum, weight decay, seed (TrainConfig).
        validation_loader: measured after every epoch when given.
        device: "cpu", "cuda", "cuda:N" or "auto".
        criterion: criterion(outputs, targets, inputs) returns the loss; default cross-entropy.
            Passing the inputs lets a distillation loss run its teacher on the same batch.
        optimizer: default SGD from `config`; pass your own to keep its state across stages.
        after_step: after_step(model, step) runs after every optimizer step (the mask updates
            of Dynamic Network Surgery use it).
        progress: a progress bar per epoch and one summary line per epoch.
        description: the progress bar's label.

    Returns:
        History: one EpochRecord per epoch (learning rate, training loss and accuracy,
        validation accuracy, seconds).

    Raises:
        ConfigError: the device is unknown or unavailable, or the loss diverges (not finite).
    """
    device = resolve_device(device)
    model.to(device)
    if optimizer is None:
        optimizer = make_optimizer(model, config)
    steps_per_epoch = len(train_loader)
    total_steps = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule_factor(config, total_steps))
    if criterion is None:

        def criterion(outputs, targets, inputs):  # noqa: ARG001 - same signature as custom losses
            return nn.functional.cross_entropy(outputs, targets)

    history = History()
    step = 0
    show = progress and _is_main_rank()
    for epoch in range(1, config.epochs + 1):
        sampler = getattr(train_loader, "sampler", None)
        batch_sampler_inner = getattr(sampler, "sampler", None)
        for candidate in (sampler, batch_sampler_inner):
            if hasattr(candidate, "set_epoch"):
                candidate.set_epoch(epoch)
        model.train()
        started = time.perf_counter()
        loss_sum = correct = seen = 0.0
        learning_rate = optimizer.param_groups[0]["lr"]
        bar = progress_bar(train_loader, desc=f"{description} {epoch}/{config.epochs}", leave=False, enabled=show)
        for inputs, targets in bar:
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            outputs = model(inputs)
            loss = criterion(outputs, targets, inputs)
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"training diverged at epoch {epoch} (loss {loss.item()}); lower the learning rate "
                    f"(learning_rate={config.learning_rate})"
                )
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if after_step is not None:
                after_step(model, step)
            batch = targets.shape[0]
            loss_sum += loss.item() * batch
            correct += (outputs.argmax(1) == targets).sum().item()
            seen += batch
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
        loss_sum, correct, seen = _sum_over_ranks([loss_sum, correct, seen], device)
        validation_accuracy = None
        if validation_loader is not None:
            validation_accuracy = evaluate(model, validation_loader, device).accuracy
        record = EpochRecord(
            epoch=epoch,
            learning_rate=learning_rate,
            train_loss=loss_sum / max(seen, 1),
            train_accuracy=correct / max(seen, 1),
            validation_accuracy=validation_accuracy,
            seconds=time.perf_counter() - started,
        )
        history.epochs.append(record)
        if show:
            shown = f" val_acc={validation_accuracy:.4f}" if validation_accuracy is not None else ""
            tqdm.write(
                f"{description} epoch {epoch}/{config.epochs}: loss={record.train_loss:.4f} "
                f"acc={record.train_accuracy:.4f}{shown} ({record.seconds:.1f}s)"
            )
    return history


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: str | torch.device = "cpu") -> Evaluation:
    """Top-1 accuracy and mean cross-entropy of `model` over `loader`, without gradients.

    Args:
        model: the network; its training mode is restored afterwards.
        loader: batches of (inputs, class labels).
        device: "cpu", "cuda", "cuda:N" or "auto".

    Returns:
        Evaluation(accuracy, loss, count), summed over every process under torchrun.

    Raises:
        ConfigError: the loader is empty, or the device is unknown or unavailable.
    """
    device = resolve_device(device)
    was_training = model.training
    model.to(device).eval()
    loss_sum = correct = count = 0.0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        outputs = model(inputs)
        loss_sum += nn.functional.cross_entropy(outputs, targets, reduction="sum").item()
        correct += (outputs.argmax(1) == targets).sum().item()
        count += targets.shape[0]
    loss_sum, correct, count = _sum_over_ranks([loss_sum, correct, count], device)
    model.train(was_training)
    if count == 0:
        raise ConfigError("cannot evaluate on an empty data loader")
    return Evaluation(accuracy=correct / count, loss=loss_sum / count, count=int(count))
