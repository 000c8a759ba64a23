"""Stage-agnostic training and evaluation loops.

`fit` takes ordinary DataLoaders, a model and a small config, and keeps no global state, so the
pruning, quantization and distillation stages reuse it for retraining. Under a process group
(torchrun) it trains the model in DistributedDataParallel, on loaders that `make_loader`
shards, and metrics are summed over all ranks (see `deepshrink.distributed`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from deepshrink import distributed
from deepshrink import inputs as batch_inputs
from deepshrink.errors import ConfigError, DeepshrinkError, ModelError
from deepshrink.inputs import Inputs
from deepshrink.progress import progress_bar
from deepshrink.tasks import Task, check_targets, check_value, resolve_task

SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adam", "adamw")
# What BatchNorm layers do while a model trains: "train" updates their statistics from each batch
# (ordinary training); "freeze" keeps them in eval mode, their stored statistics used and kept,
# which is what retraining a compressed model needs; "recalibrate" also freezes them, then
# re-estimates the stored statistics over the training data once training ends.
BATCHNORM_MODES = ("train", "freeze", "recalibrate")


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
    batchnorm: str = "train"

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
        if self.batchnorm not in BATCHNORM_MODES:
            raise ConfigError(f"batchnorm={self.batchnorm!r} should be one of {', '.join(BATCHNORM_MODES)}")

    def to_dict(self) -> dict:
        """The settings as a plain dict (for JSON metadata and recipes).

        Returns:
            {field name: value}.
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Settings from a plain dict, as `to_dict` writes it.

        Args:
            values: {field name: value}; missing fields take their defaults.

        Returns:
            The TrainConfig.

        Raises:
            ConfigError: `values` names an unknown option.
        """
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; known options are {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class Evaluation:
    """A model measured on a data set: the task's metric, the task's mean loss, the examples seen."""

    metric: float
    loss: float
    count: int
    metric_name: str = "top-1 accuracy"


@dataclass
class EpochRecord:
    epoch: int
    learning_rate: float
    train_loss: float
    train_metric: float
    validation_metric: float | None
    seconds: float


@dataclass
class History:
    epochs: list[EpochRecord] = field(default_factory=list)

    @property
    def last(self) -> EpochRecord | None:
        """The last epoch's record, or None before the first epoch."""
        return self.epochs[-1] if self.epochs else None


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Turn "auto", "cpu", "cuda" or "cuda:N" into a device, checking that it exists.

    Args:
        name: a device, a device name, or None or "auto" (a GPU when there is one).

    Returns:
        The torch.device.

    Raises:
        ConfigError: the name is not a device, or names CUDA where there is none.
    """
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


@torch.no_grad()
def check_runs_on(model: nn.Module, inputs: Inputs, device: str | torch.device = "cpu") -> None:
    """The model's first forward, on a few of the data's examples: a mismatch between the two (an
    image without its channel axis, token ids stored as floats, one tensor for a forward that
    takes several) is named with the inputs it got, where it would surface from inside torch in
    the first evaluation.

    Args:
        model: the model; left in the mode it was in.
        inputs: the data's first inputs (one tensor, or a tuple or dict of them); the first two
            examples are run.
        device: where to run it.

    Raises:
        ModelError: the inputs cannot be the forward's arguments, or the forward raised; the
            inputs' shapes and dtypes and torch's reason.
        DataError: the inputs are not tensors, or hold different numbers of examples.
        DeepshrinkError: one of ours from inside the forward, as it was.
    """
    from deepshrink.layers import unwrapped

    examples = batch_inputs.take(inputs, slice(0, 2))
    batch_inputs.check_arguments(unwrapped(model), examples)
    was_training = model.training
    try:
        batch_inputs.call(model.to(device).eval(), batch_inputs.to_device(examples, device))
    except DeepshrinkError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as error:
        raise cannot_run(batch_inputs.describe(examples), "the first two examples", error) from error
    finally:
        model.train(was_training)


def cannot_run(what: str, which: str, error: Exception) -> ModelError:
    """The error for data a model cannot run on: what it was given, and torch's reason.

    Args:
        what: the inputs, e.g. "inputs of shape [2, 20], float32" (`inputs.describe`).
        which: which of the data they are, e.g. "the first two examples".
        error: what the forward raised.

    Returns:
        The ModelError, for the caller to raise from `error`.
    """
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelError(
        f"the model cannot run on the data: its forward, given {which} ({what}), raised "
        f"{type(error).__name__}: {reason}. Make the data's inputs what the model takes "
        "(their shape after the example axis, integer token ids for an Embedding, one array per argument "
        "named x.ARGUMENT for a forward that takes several)"
    )


def one_tensor(outputs) -> torch.Tensor:
    """A model's outputs as the one tensor a task scores.

    Args:
        outputs: what the model's forward returned.

    Returns:
        `outputs`, when it is a tensor.

    Raises:
        ModelError: anything else (a tuple, a dict of outputs), described.
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    raise ModelError(
        f"the model's forward returned {_described(outputs)}, not one tensor: a task scores one tensor of "
        f"outputs (e.g. the logits). Name it in the recipe (`output: {_output_example(outputs)}`; on the command "
        f"line --output {_output_example(outputs)}), or wrap the model in a module whose forward returns that tensor"
    )


def _output_example(outputs) -> str:
    """What `output` would pick the first tensor of what a forward returned."""
    if isinstance(outputs, Mapping):
        key = next((key for key, value in outputs.items() if isinstance(value, torch.Tensor)), None)
        return key if isinstance(key, str) else "KEY"
    if isinstance(outputs, (tuple, list)):
        return "0"
    return "ATTRIBUTE"


# The .dcz metadata entry that records which output the file's task scores (`select_output`).
OUTPUT_KEY = "output"
# The .dcz metadata entry that names a model's several inputs (keywords, or positions "0", "1").
INPUT_NAMES_KEY = "input_names"


@dataclass(frozen=True)
class OutputSelector:
    """A forward hook that makes a model return the one tensor `output` names of what its
    forward returns: a key of a dict (Hugging Face's ModelOutput is one), an index of a tuple or
    list ("0"), or an attribute. A forward that returns one tensor is left as it is."""

    output: str

    def __call__(self, module: nn.Module, inputs: tuple, outputs):
        """The tensor `output` names, as torch's forward hook replaces a forward's result.

        Args:
            module: the model.
            inputs: its forward's inputs.
            outputs: what its forward returned.

        Returns:
            The named tensor.

        Raises:
            ModelError: nothing by that name, or something other than a tensor there.
        """
        if isinstance(outputs, torch.Tensor):
            # One tensor is already what a task scores: a model that adds auxiliary outputs only
            # while training (Inception, GoogLeNet) returns its logits alone in eval mode.
            return outputs
        if isinstance(outputs, Mapping) and self.output in outputs:
            chosen = outputs[self.output]
        elif isinstance(outputs, (tuple, list)) and self.output.lstrip("-").isdigit():
            index = int(self.output)
            if not -len(outputs) <= index < len(outputs):
                raise ModelError(f"output: {self.output} is past the end of {_described(outputs)}")
            chosen = outputs[index]
        elif not isinstance(outputs, Mapping) and hasattr(outputs, self.output):
            chosen = getattr(outputs, self.output)
        else:
            raise ModelError(
                f"output: {self.output!r} is not in what the model's forward returned: {_described(outputs)}"
            )
        if not isinstance(chosen, torch.Tensor):
            raise ModelError(f"output: {self.output!r} is {_described(chosen)}; it should name one tensor")
        return chosen


def select_output(model: nn.Module, output: str | None) -> nn.Module:
    """Make `model` return the one tensor `output` names of what its forward returns (see
    OutputSelector), by a forward hook, so that every stage, the teacher, and the copies made
    of it (deepcopy keeps hooks) see that tensor. None leaves the model as it is; a model that
    already selects is not given a second hook.

    Args:
        model: the model, given the hook in place.
        output: a dict key, a tuple index ("0") or an attribute; None for none.

    Returns:
        `model`.
    """
    if output is not None and not any(isinstance(hook, OutputSelector) for hook in model._forward_hooks.values()):
        model.register_forward_hook(OutputSelector(output))
    return model


def _described(outputs, depth: int = 0) -> str:
    """What a forward returned, in a few words: "a tuple of 2 (Tensor [8, 2], Tensor [8, 32])"."""
    if isinstance(outputs, torch.Tensor):
        return f"Tensor {list(outputs.shape)}"
    if depth < 1 and isinstance(outputs, (tuple, list)):
        items = ", ".join(_described(item, depth + 1) for item in outputs[:4])
        return f"a {type(outputs).__name__} of {len(outputs)} ({items}{', ...' if len(outputs) > 4 else ''})"
    if depth < 1 and isinstance(outputs, dict):
        items = ", ".join(f"{key!r}: {_described(value, depth + 1)}" for key, value in list(outputs.items())[:4])
        return f"a {type(outputs).__name__} of {len(outputs)} ({items}{', ...' if len(outputs) > 4 else ''})"
    return f"a {type(outputs).__name__}"


def _schedule_factor(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    if config.schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    if config.schedule == "step":
        milestones = (total_steps // 2, (3 * total_steps) // 4)
        return lambda step: 0.1 ** sum(step >= milestone for milestone in milestones)
    return lambda step: 1.0


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `config` names, over `model`'s trainable parameters.

    Args:
        model: the model to train.
        config: the optimizer ("sgd", "adam" or "adamw"), learning rate, momentum and weight decay.

    Returns:
        The torch optimizer.

    Raises:
        ModelError: no parameter has requires_grad set.
    """
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if not trainable:
        raise ModelError(
            f"every parameter of {type(model).__name__} has requires_grad=False, so retraining has nothing to "
            "train: pass model.requires_grad_(True) (a pruned or shared layer keeps its mask or codebook "
            "while it trains), or compress without retraining (retrain_epochs: 0 and finetune_epochs: 0)"
        )
    if config.optimizer == "adamw":
        # Weight decay apart from the gradient's scaling (Loshchilov & Hutter 2019): how
        # transformers are trained.
        return torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        # Adam scales each parameter's step by its own gradient history, which suits codebooks:
        # a centroid's gradient sums those of all its weights, so its size varies by orders of
        # magnitude from layer to layer.
        return torch.optim.Adam(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        trainable, lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
    )


def training_set_size(loader, what: str) -> int:
    """N, the number of training examples behind `loader`, for a loss written per example.

    Args:
        loader: a DataLoader.
        what: the method that needs N, for the error.

    Returns:
        len(loader.dataset).

    Raises:
        ConfigError: the loader's data set has no length (an IterableDataset).
    """
    try:
        return len(loader.dataset)
    except (TypeError, AttributeError):
        raise ConfigError(
            f"{what} weighs its regulariser by the number of training examples; give a DataLoader over a "
            "data set with a length (not an IterableDataset)"
        ) from None


class RegularizedLoss:
    """A training loss with a regulariser: criterion(outputs, targets, inputs) (default the
    task's loss) plus scale(step) x penalty(), for `fit`. Variational dropout's KL and soft
    weight-sharing's mixture prior are penalties; `scale` carries N and any warm-up."""

    def __init__(
        self,
        penalty: Callable[[], torch.Tensor],
        scale: Callable[[int], float],
        criterion: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        task: Task | str | None = None,
    ) -> None:
        self.penalty, self.scale, self.criterion, self.task = penalty, scale, criterion, resolve_task(task)
        self.steps = 0

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """The loss of one training batch (each call is one step).

        Args:
            outputs: the model's outputs.
            targets: the batch's targets.
            inputs: the batch's inputs (for a criterion that needs them).

        Returns:
            The scalar loss.
        """
        data = self.criterion(outputs, targets, inputs) if self.criterion else self.task.loss(outputs, targets)
        self.steps += 1
        return data + self.scale(self.steps) * self.penalty()


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    config: TrainConfig,
    *,
    validation_loader: DataLoader | None = None,
    device: str | torch.device = "cpu",
    task: Task | str | None = None,
    criterion: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    after_step: Callable[[nn.Module, int], None] | None = None,
    progress: bool = True,
    description: str = "train",
) -> History:
    """Train `model` in place for `config.epochs` epochs and return the per-epoch history.

    Args:
        model: the network, moved to `device`.
        train_loader: batches of (inputs, targets), the inputs one tensor or, for a forward
            that takes several, a tuple (positional) or dict (keyword arguments) of tensors; or
            dicts of keyword arguments with the targets under "labels".
        config: epochs, learning rate and schedule, momentum, weight decay, seed (TrainConfig).
        validation_loader: measured after every epoch when given.
        device: "cpu", "cuda", "cuda:N" or "auto".
        task: the Task (or its name) whose loss trains and whose metric is logged; default
            classification (cross-entropy, top-1 accuracy).
        criterion: criterion(outputs, targets, inputs) returns the loss instead of the task's.
            Passing the inputs lets a distillation loss run its teacher on the same batch. A
            criterion with an `extra_inputs(inputs)` method gets those rows appended to the
            batch's inputs and outputs (the targets cover the batch's own rows only).
        optimizer: default SGD from `config`; pass your own to keep its state across stages.
            Under a process group the model trains in DistributedDataParallel (gradients
            averaged over ranks); give each rank its shard of the data (`make_loader` does).
        after_step: after_step(model, step) runs after every optimizer step (the mask updates
            of Dynamic Network Surgery use it).
        progress: a progress bar per epoch and one summary line per epoch.
        description: the progress bar's label.

    Returns:
        History: one EpochRecord per epoch (learning rate, training loss and metric,
        validation metric, seconds).

    Raises:
        ConfigError: the device is unknown or unavailable, the loss diverges (not finite), or
            the metric is not a finite number.
    """
    device = resolve_device(device)
    model.to(device)
    if optimizer is None:
        optimizer = make_optimizer(model, config)
    steps_per_epoch = len(train_loader)
    total_steps = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule_factor(config, total_steps))
    task = resolve_task(task)
    if criterion is None:

        def criterion(outputs, targets, inputs):  # noqa: ARG001 - same signature as custom losses
            return task.loss(outputs, targets)

    history = History()
    step = 0
    show = progress and distributed.is_main_process()
    # The model in DistributedDataParallel under a process group, the model itself alone: the
    # forward and backward go through it, everything else (hooks, evaluation) sees the model.
    training_model = distributed.wrap_for_training(model, device)
    for epoch in range(1, config.epochs + 1):
        sampler = getattr(train_loader, "sampler", None)
        batch_sampler_inner = getattr(sampler, "sampler", None)
        for candidate in (sampler, batch_sampler_inner):
            if hasattr(candidate, "set_epoch"):
                candidate.set_epoch(epoch)
        training_model.train()
        if config.batchnorm != "train":
            freeze_batchnorm(model)
        started = time.perf_counter()
        loss_sum = seen = 0.0
        sums = None
        learning_rate = optimizer.param_groups[0]["lr"]
        bar = progress_bar(train_loader, desc=f"{description} {epoch}/{config.epochs}", leave=False, enabled=show)
        for batch in bar:
            inputs, targets = inputs_and_targets(batch)
            inputs = batch_inputs.to_device(inputs, device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            # A criterion may ask for more inputs than the batch (distillation's mixed examples):
            # they go through the same forward, after the batch's own rows, and only the criterion
            # sees their outputs.
            more_inputs = getattr(criterion, "extra_inputs", None)
            if more_inputs is not None:
                inputs = batch_inputs.concatenate([inputs, more_inputs(inputs)])
            outputs = one_tensor(batch_inputs.call(training_model, inputs))
            check_targets(task, outputs[: len(targets)], targets)
            loss = criterion(outputs, targets, inputs)
            outputs = outputs[: len(targets)]
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"training diverged at epoch {epoch} (loss {loss.item()}); lower the learning rate "
                    f"(learning_rate={config.learning_rate}), and check that the data holds no NaN or infinity"
                )
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if after_step is not None:
                after_step(model, step)
            batch = outputs.shape[0]
            loss_sum += loss.item() * batch
            with torch.no_grad():
                statistics = task.metric.statistics(outputs.detach(), targets).cpu().double()
            sums = statistics if sums is None else sums + statistics
            seen += batch
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        if config.batchnorm == "recalibrate":
            recalibrate_batchnorm(model, train_loader, device)
        totals = distributed.sum_values_over_ranks([loss_sum, seen, *(sums.tolist() if sums is not None else [])])
        loss_sum, seen = totals[0], totals[1]
        train_metric = task.metric.finish(totals[2:]) if sums is not None else float("nan")
        validation_metric = None
        if validation_loader is not None:
            validation_metric = evaluate(model, validation_loader, device, task).metric
        record = EpochRecord(
            epoch=epoch,
            learning_rate=learning_rate,
            train_loss=loss_sum / max(seen, 1),
            train_metric=train_metric,
            validation_metric=validation_metric,
            seconds=time.perf_counter() - started,
        )
        history.epochs.append(record)
        if show:
            shown = f" validation {validation_metric:.4f}" if validation_metric is not None else ""
            tqdm.write(
                f"{description} epoch {epoch}/{config.epochs}: loss={record.train_loss:.4f} "
                f"{task.metric.name} {record.train_metric:.4f}{shown} ({record.seconds:.1f}s)"
            )
    return history


def inputs_and_targets(batch) -> tuple[Inputs, torch.Tensor]:
    """A batch's (inputs, targets).

    Args:
        batch: a pair (inputs, targets), whose inputs may be a tuple or dict of tensors, or a dict
            of keyword arguments with the targets under "labels" (what Hugging Face's collators
            make).

    Returns:
        (inputs, targets).

    Raises:
        ConfigError: a batch of another form, with the form to give.
    """
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping) and "labels" in batch:
        return {key: value for key, value in batch.items() if key != "labels"}, batch["labels"]
    if isinstance(batch, Mapping):
        raise ConfigError(
            f"training and evaluating need batches of (inputs, targets), got a dict with keys "
            f"{', '.join(map(repr, list(batch)[:6]))} and no 'labels': give the targets under 'labels' (the other "
            "keys are the forward's keyword arguments), or make each batch a pair (inputs, targets)"
        )
    raise ConfigError(
        "training and evaluating need batches of (inputs, targets), got "
        f"{type(batch).__name__}{f' of {len(batch)}' if isinstance(batch, list | tuple) else ''}; for data without "
        "targets, let deepshrink.run make them from the original model, or add them with pipeline.with_targets_from"
    )


class FirstExamples:
    """The first `count` examples of a loader's batches, as batches (the last one cut short):
    what a measurement repeated hundreds of times runs on, where the whole split would take hours.

    Args:
        loader: batches as `inputs_and_targets` reads them.
        count: the examples to give, at least 1.
    """

    def __init__(self, loader, count: int) -> None:
        self.loader = loader
        self.count = count

    def __iter__(self):
        left = self.count
        for batch in self.loader:
            inputs, targets = inputs_and_targets(batch)
            size = batch_inputs.count(inputs)
            if size >= left:
                yield batch_inputs.take(inputs, slice(0, left)), targets[:left]
                return
            yield inputs, targets
            left -= size


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer of `model` in eval mode: its stored statistics normalise and stay
    as they are, while its scale and shift still train.

    Args:
        model: the model, changed in place.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: DataLoader, device: str | torch.device = "cpu") -> None:
    """Re-estimate every BatchNorm layer's stored mean and variance as the average over `loader`
    (one pass, no gradients, weights unchanged), for the network as it is now.

    Args:
        model: the model, changed in place; its training mode is restored afterwards.
        loader: the batches to average over (inputs, targets).
        device: where `model` lives.
    """
    layers = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return
    was_training = model.training
    saved = [(layer, layer.momentum) for layer in layers]
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # None: a cumulative average over every batch seen
        layer.train()
    for batch in loader:
        inputs, _ = inputs_and_targets(batch)
        batch_inputs.call(model, batch_inputs.to_device(inputs, device))
    # Under a process group each rank saw its own shard, the same number of batches on each:
    # the mean of the ranks' averages is the average over all of them.
    for layer in layers:
        for statistic in (layer.running_mean, layer.running_var):
            if statistic is not None:
                distributed.sum_over_ranks(statistic).div_(distributed.world_size())
    for layer, momentum in saved:
        layer.momentum = momentum
    model.train(was_training)
    if was_training:
        freeze_batchnorm(model)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: str | torch.device = "cpu", task: Task | str | None = None
) -> Evaluation:
    """The task's metric and mean loss of `model` over `loader`, without gradients.

    Args:
        model: the network; its training mode is restored afterwards.
        loader: batches of (inputs, targets), as for `fit`.
        device: "cpu", "cuda", "cuda:N" or "auto".
        task: the Task or its name; default classification (top-1 accuracy, cross-entropy).

    Returns:
        Evaluation(metric, loss, count, metric_name), summed over every process under torchrun.

    Raises:
        ConfigError: the loader is empty, the device is unknown or unavailable, or the metric
            is not a finite number.
    """
    device = resolve_device(device)
    task = resolve_task(task)
    was_training = model.training
    model.to(device).eval()
    loss_sum = count = 0.0
    sums = None
    for pair in loader:
        inputs, targets = inputs_and_targets(pair)
        inputs, targets = batch_inputs.to_device(inputs, device), targets.to(device)
        outputs = one_tensor(batch_inputs.call(model, inputs))
        check_targets(task, outputs, targets)
        batch = outputs.shape[0]
        loss_sum += task.loss(outputs, targets).item() * batch
        statistics = task.metric.statistics(outputs, targets).cpu().double()
        sums = statistics if sums is None else sums + statistics
        count += batch
    model.train(was_training)
    if count == 0:
        raise ConfigError("cannot evaluate on an empty data loader")
    totals = distributed.sum_values_over_ranks([loss_sum, count, *sums.tolist()])
    metric = check_value(task, task.metric.finish(totals[2:]), f"{int(totals[1])} examples")
    return Evaluation(metric=metric, loss=totals[0] / totals[1], count=int(totals[1]), metric_name=task.metric.name)
