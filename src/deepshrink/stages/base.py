"""The shape every stage has, and the registry that joins a settings class to its handler.

A stage is a frozen settings dataclass plus one handler,
`handler(model, settings, context) -> StageResult`, registered once with `register_stage`.
`run_stage` is the one entry: the pipeline, the Figure 6 sweep and the per-stage commands all
call it, so a stage behaves the same however it is reached. As torchao joins a config to its
transform, the settings' type says which handler runs; nothing outside a stage's own module
names it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from deepshrink.data import DataSplits, make_loader
from deepshrink.errors import ConfigError
from deepshrink.inputs import first
from deepshrink.layers import check_weights
from deepshrink.tasks import Task, classification


@dataclass(frozen=True)
class Loaders:
    """The data a stage sees. `train` is a factory so that each stage can draw its own batch
    size and shuffling seed; a user's fixed DataLoader is wrapped with `Loaders.fixed`."""

    train: Callable[[int, int], DataLoader]  # (batch_size, seed) -> DataLoader
    validation: DataLoader
    test: DataLoader

    @classmethod
    def from_splits(cls, data: DataSplits, test_subset: int | None = None) -> Loaders:
        """Loaders over deepshrink's own splits (`deepshrink.load_data`), the test split
        optionally cut to its first `test_subset` examples.

        Args:
            data: the splits.
            test_subset: keep only the first this many test examples.

        Returns:
            The Loaders.
        """
        test = data.test
        if test_subset is not None:
            test = first(data.test, test_subset)
        return cls(
            train=lambda batch_size, seed: make_loader(data.train, batch_size, shuffle=True, seed=seed),
            validation=make_loader(data.validation, 1000, shuffle=False),
            test=make_loader(test, 1000, shuffle=False),
        )

    @classmethod
    def fixed(cls, train: DataLoader, validation: DataLoader, test: DataLoader) -> Loaders:
        """Your own loaders; the stages' batch_size settings then do not apply.

        Args:
            train: the training loader.
            validation: the validation loader.
            test: the test loader.

        Returns:
            The Loaders.
        """
        return cls(train=lambda batch_size, seed: train, validation=validation, test=test)


@dataclass
class StageContext:
    """What a stage works with besides the model and its settings.

    `task` gives the retraining loss and the metric that chooses and reports (default
    classification). `batchnorm` is how BatchNorm layers behave while retraining: "freeze" (the
    default: eval mode, stored statistics kept), "train" or "recalibrate" (see TrainConfig).
    `teacher` is the model distillation retrains against (default: the model as it enters the
    stage). A stage that writes a file writes it to `output`, with `model_name` and `metadata`
    recorded in it and never over a path in `protect`. `loaders` is None when there is no data:
    a stage then works without retraining and without measuring, and says so, or refuses.
    `earlier` holds the results of the stages run before this one in the same run, by stage
    name (what a stage may build on, such as the posterior variational dropout recorded).
    """

    loaders: Loaders | None
    seed: int = 0
    device: str | torch.device = "cpu"
    progress: bool = True
    task: Task = field(default_factory=classification)
    batchnorm: str = "freeze"
    teacher: nn.Module | None = None
    output: Path | None = None
    model_name: str | None = None
    metadata: dict = field(default_factory=dict)
    protect: tuple = ()
    earlier: dict = field(default_factory=dict)


@dataclass
class StageResult:
    """What a stage did: a log (plain data), its metrics (numbers, e.g. the validation metric),
    the architecture it left (`structure`, for stages that change layers, such as low-rank), the
    arrays behind its figures (`tensors`) and the files it wrote. Saves and reloads itself."""

    stage: str
    log: dict = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    structure: dict | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Everything but the tensors, as JSON-ready data (for checkpoint metadata and reports).

        Returns:
            {"stage", "log", "metrics", "structure", "files"}.
        """
        return {
            "stage": self.stage,
            "log": self.log,
            "metrics": self.metrics,
            "structure": self.structure,
            "files": self.files,
        }

    @classmethod
    def from_dict(cls, data: dict, tensors: dict[str, torch.Tensor] | None = None) -> StageResult:
        """A result from `to_dict`'s data and its tensors.

        Args:
            data: what `to_dict` returned.
            tensors: the result's tensors.

        Returns:
            The StageResult.

        Raises:
            ConfigError: `data` is not a stage result.
        """
        if not isinstance(data, dict) or not isinstance(data.get("stage"), str):
            raise ConfigError(f"not a stage result: {str(data)[:80]!r}")
        return cls(
            data["stage"],
            data.get("log") or {},
            data.get("metrics") or {},
            data.get("structure"),
            tensors or {},
            list(data.get("files") or []),
        )

    def save(self, path: str | os.PathLike, protect: tuple = ()) -> Path:
        """Write the result as a safetensors file (its tensors) with its data as metadata, atomically.

        Args:
            path: the .safetensors file to write.
            protect: input paths that `path` must not be.

        Returns:
            `path` as a Path.
        """
        from deepshrink.checkpoint import save_state_dict

        return save_state_dict(
            path, self.tensors, model_name=None, metadata={"result": self.to_dict()}, protect=protect
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> StageResult:
        """A result as `save` wrote it.

        Args:
            path: the .safetensors file.

        Returns:
            The StageResult.

        Raises:
            CheckpointError: the file cannot be read.
            ConfigError: it holds no stage result.
        """
        from deepshrink.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(path)
        return cls.from_dict(checkpoint.metadata.get("result"), checkpoint.state_dict)


@dataclass(frozen=True)
class Stage:
    """A registered stage.

    - `order`: where it runs in a recipe (lower first).
    - `changes_model`: it changes the model in place (its result is cached as a checkpoint);
      otherwise it writes a file (`output_suffix`), and `written_key(path)` reads back the
      cache key a previous run recorded in that file (None when absent or unreadable).
    - `always`: it runs with its default settings when a recipe leaves its section out.
    - `changes_architecture`: it replaces layers (its result has a `structure`), so it cannot
      run again on a model it already changed.
    - `after_folding`: it works on the weights the network applies, so with `batchnorm: fold`
      BatchNorm is folded into the layers before it first (weight sharing and encoding).
    - `planned_late`: a recipe's target that must wait for a pruning that learns its sparsities
      (`Recipe.plans_after_pruning`) is planned just before this stage (weight sharing, whose
      bits it then chooses).
    - `summarize(model, result)`: the table a command prints after running the stage alone.
    """

    name: str
    settings: type
    handler: Callable[[nn.Module, object, StageContext], StageResult]
    order: int
    description: str
    changes_model: bool = True
    always: bool = False
    output_suffix: str | None = None
    written_key: Callable[[Path], str | None] | None = None
    summarize: Callable[[nn.Module, StageResult], str] | None = None
    changes_architecture: bool = False
    after_folding: bool = False
    planned_late: bool = False


_REGISTRY: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    """Add a stage to the registry; its name becomes a recipe section and a command.

    Args:
        stage: the Stage (name, settings class, handler, summary, order).

    Returns:
        `stage`, so that this can decorate.

    Raises:
        TypeError: the settings are not a dataclass.
        ValueError: another stage has the name.
    """
    if not dataclasses.is_dataclass(stage.settings):
        raise TypeError(f"stage {stage.name!r}: settings {stage.settings!r} should be a dataclass")
    if stage.name in _REGISTRY and _REGISTRY[stage.name] != stage:
        raise ValueError(f"a stage named {stage.name!r} is registered already")
    _REGISTRY[stage.name] = stage
    return stage


def registered_stages() -> list[Stage]:
    """Every registered stage, in the order a recipe runs them.

    Returns:
        The Stages, sorted by their order.
    """
    return sorted(_REGISTRY.values(), key=lambda stage: stage.order)


def stage_named(name: str) -> Stage:
    """The registered stage called `name`.

    Args:
        name: e.g. "prune".

    Returns:
        The Stage.

    Raises:
        ConfigError: no stage has that name.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"no stage named {name!r}; the stages are {', '.join(_REGISTRY)}") from None


def stage_for(settings) -> Stage:
    """The registered stage whose settings class `settings` is an instance of.

    Args:
        settings: an instance of a stage's settings class.

    Returns:
        The Stage.

    Raises:
        ConfigError: no registered stage has that settings class.
    """
    for stage in _REGISTRY.values():
        if type(settings) is stage.settings:
            return stage
    raise ConfigError(f"{type(settings).__name__} is not the settings of a registered stage")


def run_stage(model: nn.Module, settings, context: StageContext) -> StageResult:
    """Run the stage that `settings` belong to on `model` (in place) and return its result.

    Args:
        model: the network; the stage changes it in place (the encode stage writes a file).
        settings: a registered stage's settings (PruneSettings, QuantizeSettings, ...).
        context: data loaders, seed, device, progress and output path (StageContext).

    Returns:
        The stage's StageResult: its log, metrics and files.

    Raises:
        ConfigError: no registered stage takes these settings; what the stage itself raises.
        UnsupportedLayerError, ModelError: a weight tied to a tensor no stage compresses, or
            parameters that are not float32 (layers.check_weights).
    """
    stage = stage_for(settings)
    check_weights(model)
    return stage.handler(model, settings, context)


def stage_metadata(result: StageResult, settings, *, key: str | None = None, architecture: dict | None = None) -> dict:
    """The metadata a stage's checkpoint carries, the same from a recipe and from a command:
    the stage, its settings, its result and the architecture every later load must rebuild
    (`architecture`: the factored layers and folded BatchNorm of the model entering the stage).

    Args:
        result: the stage's result.
        settings: the stage's settings.
        key: the cache key of the stage, when it ran from a recipe.
        architecture: the metadata of the model entering the stage.

    Returns:
        The metadata dict, JSON-ready.
    """
    from deepshrink.batchnorm import FOLDED_KEY
    from deepshrink.loading import STRUCTURE_KEY

    architecture = architecture or {}
    metadata = {
        "stage": result.stage,
        "key": key,
        "settings": json.loads(json.dumps(dataclasses.asdict(settings), default=str)),
        "result": result.to_dict(),
        STRUCTURE_KEY: result.structure or architecture.get(STRUCTURE_KEY),
    }
    return metadata | ({FOLDED_KEY: architecture[FOLDED_KEY]} if architecture.get(FOLDED_KEY) else {})
