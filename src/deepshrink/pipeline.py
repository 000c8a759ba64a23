"""The one place the stages are composed: the reference, then every registered stage the recipe
names, in the registry's order (low-rank, prune, quantize, encode), then the report.

Each stage's result is cached in the run directory under a key that covers the stage's recipe
section and everything that fed it (the reference's weights, the data, the seed, the previous
stage's key), so a rerun of the same recipe skips finished stages and a changed section redoes
that stage and the ones after it. Every file is written atomically: interrupting a run at any
point leaves the finished stages on disk and no half-written file.

The accuracy reported as "compressed" is measured on the model decoded from the written .dcz
file, never on the model in memory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from deepshrink.checkpoint import load_checkpoint, load_state_into, save_checkpoint
from deepshrink.data import DataSplits
from deepshrink.encode.sizes import parameter_bytes
from deepshrink.errors import ConfigError, ModelError
from deepshrink.layers import compressible_layers
from deepshrink.loading import STRUCTURE_KEY
from deepshrink.recipe import Recipe, load_recipe, recipe_from_dict
from deepshrink.stages import Loaders, StageContext, StageResult, registered_stages, run_stage, stage_metadata
from deepshrink.train import evaluate, resolve_device


@dataclass
class StageRun:
    """One stage of a run: its cache key, whether it came from the cache, and its result."""

    name: str
    key: str
    cached: bool
    seconds: float
    result: StageResult

    def to_dict(self) -> dict:
        return {"name": self.name, "key": self.key, "cached": self.cached, "seconds": self.seconds} | {
            "log": self.result.log,
            "metrics": self.result.metrics,
        }


@dataclass
class RunResult:
    """What `compress` produced: the file, the accuracies that count, and the report's data."""

    path: Path
    run_dir: Path
    model_name: str
    reference_accuracy: float
    compressed_accuracy: float  # of the model decoded from `path`
    file_bytes: int
    parameter_bytes: int
    stages: list[StageRun]
    report: dict = field(default_factory=dict)
    data_name: str = "your data"  # the data set's directory name, or "your data" for your loaders

    @property
    def ratio(self) -> float:
        return self.parameter_bytes / self.file_bytes


def _as_recipe(recipe: Recipe | str | os.PathLike | dict) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    return load_recipe(recipe)


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def weights_digest(model: nn.Module) -> str:
    """A content hash of a model's state_dict: the identity of a stage's input."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise ModelError(f"run() needs a torch.nn.Module, got {type(model).__name__}")
    if not compressible_layers(model):
        raise ModelError(
            f"{type(model).__name__} has no Linear, Conv1d, Conv2d or Embedding layer; there is nothing to compress"
        )
    parametrized = [name for name, module in model.named_modules() if hasattr(module, "parametrizations")]
    if parametrized:
        raise ModelError(
            f"the model passed to run() is already pruned or shared ({', '.join(parametrized[:3])}); "
            "pass the trained reference, or run single stages with deepshrink.run_stage"
        )


def run(
    model: nn.Module,
    recipe: Recipe | str | os.PathLike | dict,
    data: DataSplits | Loaders,
    *,
    run_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> RunResult:
    """Run `recipe` on a trained `model`: every stage it names, in order, then RUN_DIR/MODEL.dcz
    and the report (`deepshrink run RECIPE` on the command line).

    Args:
        model: the trained reference; never modified.
        recipe: a Recipe, a YAML file, a shipped recipe's name ("lenet-5") or a dict.
        data: a DataSplits (from deepshrink.load_data) or your own loaders
            (`deepshrink.Loaders.fixed(train, validation, test)`; cached stages then assume the
            same data on a rerun).
        run_dir: where stage checkpoints, the file and the report go (default runs/MODEL).
        model_name: the name recorded in the file (default: the recipe's model, or the class name).
        device: "auto", "cpu", "cuda" or "cuda:N".
        progress: progress bars and one line per stage.

    Returns:
        A RunResult: the file, its size against fp32 parameters, and the test accuracy of the
        reference and of the model decoded from the file.

    Raises:
        ConfigError for a bad recipe or data argument, ModelError for a model with nothing to
        compress, and the stages' own errors.
    """
    recipe = _as_recipe(recipe)
    _check_model(model)
    name = model_name or recipe.model or type(model).__name__.lower()
    run_dir = Path(run_dir or Path("runs") / _file_stem(name))
    device = resolve_device(device)
    layer_names = list(compressible_layers(model))
    if recipe.lowrank is not None:  # a factored layer NAME becomes NAME.0 and NAME.1
        layer_names += [f"{name}.{part}" for name in layer_names for part in (0, 1)]
    recipe.check_layers(layer_names)
    if isinstance(data, DataSplits):
        loaders = Loaders.from_splits(data, recipe.data.test_subset)
        data_key = [data.fingerprint, len(data.train), recipe.data.test_subset]
    elif isinstance(data, Loaders):
        loaders, data_key = data, ["user loaders"]
    else:
        raise ConfigError(f"data should be a DataSplits (deepshrink.load_data()) or Loaders, got {type(data).__name__}")
    reference = copy.deepcopy(model).to(device).eval()
    input_key = _digest(weights_digest(reference), data_key, recipe.seed)
    reference_accuracy = evaluate(reference, loaders.test, device).accuracy
    stages_run: list[StageRun] = []
    current = reference
    key = input_key
    out = None
    structure = None  # set by a stage that changes layers (low-rank), for every later load
    for stage in registered_stages():
        settings = recipe.stages.get(stage.name)
        if settings is None:
            continue
        key = _digest(key, stage.name, recipe.section(stage.name))
        context = StageContext(loaders, seed=recipe.seed, device=device, progress=progress, teacher=reference)
        started = time.perf_counter()
        if stage.changes_model:
            path = run_dir / "stages" / f"{stage.name}-{key[:16]}.safetensors"
            result_path = path.with_suffix(".result.safetensors")
            cached = path.exists() and result_path.exists()
            if cached:
                current = load_state_into(copy.deepcopy(reference), load_checkpoint(path), path).to(device)
                result = StageResult.load(result_path)
            else:
                _say(progress, f"{stage.name}: running")
                # Stages work on copies: the reference stays untouched for the report and the sweep.
                current = copy.deepcopy(reference) if current is reference else current
                result = run_stage(current, settings, context)
                metadata = stage_metadata(result, settings, key=key, structure=structure)
                save_checkpoint(path, current, model_name=name, metadata=metadata)
                result.save(result_path)
            structure = result.structure or structure
        else:  # a stage that writes the run's file
            path = out = run_dir / f"{_file_stem(name)}{stage.output_suffix}"
            cached = stage.written_key is not None and stage.written_key(out) == key
            if cached:
                result = StageResult(stage.name, {"file": out.name}, files=[str(out)])
            else:
                context.output, context.model_name = out, name
                context.metadata = {"stage_key": key, "recipe": recipe.to_dict(), STRUCTURE_KEY: structure}
                result = run_stage(current, settings, context)
        stages_run.append(StageRun(stage.name, key, cached, time.perf_counter() - started, result))
        _say(progress, f"{stage.name}: {'cached' if cached else 'done'} in {stages_run[-1].seconds:.1f}s ({path.name})")

    # The accuracy that counts: decode the file that was written into a fresh copy of the model.
    from deepshrink.compressed import load_compressed

    decoded, _ = load_compressed(out, copy.deepcopy(model))
    compressed_accuracy = evaluate(decoded, loaders.test, device).accuracy

    tradeoff = None
    if recipe.tradeoff is not None:
        tradeoff = _tradeoff(reference, recipe, loaders, input_key, run_dir, device, progress)

    from deepshrink.report import write_report

    result = RunResult(
        path=out,
        run_dir=run_dir,
        model_name=name,
        reference_accuracy=reference_accuracy,
        compressed_accuracy=compressed_accuracy,
        file_bytes=out.stat().st_size,
        parameter_bytes=parameter_bytes(model),
        stages=stages_run,
        data_name=Path(data.source).name if isinstance(data, DataSplits) else "your data",
    )
    result.report = write_report(result, recipe, current.cpu(), tradeoff)
    return result


@dataclass
class StageOnCheckpoint:
    """What `run_stage_on_checkpoint` did: the model after the stage, the stage's result, the
    test accuracy before and after (after: of the decoded file, for a stage that writes one) and
    the file written."""

    model: nn.Module
    result: StageResult
    reference_accuracy: float
    accuracy: float | None
    path: Path


def run_recipe(
    recipe: str | os.PathLike,
    *,
    model_name: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = True,
) -> RunResult:
    """`run` from names and paths, as `deepshrink run RECIPE` does: the recipe's model (or
    `model_name`), trained weights from `checkpoint` or the registered model's cached reference,
    and the data set in `data_dir` (default: the installed one).

    Args:
        recipe: a YAML file or a shipped recipe's name.
        model_name: overrides the recipe's model: a registered name or package.module:factory.
        checkpoint: the trained weights to start from; required for a user's factory.
        data_dir: an MNIST-format data set (see `load_data`).
        run_dir, device, progress: as for `run`.

    Returns:
        The RunResult of `run`.

    Raises:
        ConfigError: the recipe names no model, or a user's factory comes without a checkpoint;
        and what `load_recipe`, `load_data`, `load_model`, `reference_model` and `run` raise.
    """
    from deepshrink.checkpoint import load_model
    from deepshrink.data import load_data
    from deepshrink.models import is_factory_path
    from deepshrink.recipe import load_recipe
    from deepshrink.references import reference_model

    loaded = load_recipe(recipe)
    name = model_name or loaded.model
    if name is None:
        raise ConfigError(f"{recipe}: the recipe names no model; add `model: NAME` or pass model_name=NAME")
    data = load_data(data_dir, seed=0, train_subset=loaded.data.train_subset)
    if checkpoint is not None:
        model, _ = load_model(checkpoint, name)
    elif is_factory_path(name):
        raise ConfigError(f"model {name} is your own network: pass its trained weights with checkpoint=FILE")
    else:
        model = reference_model(name, data, device=device, progress=progress).model
    return run(model, loaded, data, run_dir=run_dir, model_name=name, device=device, progress=progress)


def run_stage_on_checkpoint(
    checkpoint: str | os.PathLike,
    settings,
    data: DataSplits,
    out: str | os.PathLike,
    *,
    model: nn.Module | str | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    evaluate_output: bool = True,
) -> StageOnCheckpoint:
    """One stage on a checkpoint, the same stage a recipe section runs (`deepshrink prune`,
    `quantize`, `lowrank`, `encode`): load, run through `run_stage`, write `out` (a checkpoint
    with the same metadata a recipe's stage checkpoint has, or the stage's own file), and
    measure test accuracy before and after. `model` overrides the model the checkpoint names.

    Raises ConfigError for a stage that cannot run again on what it already changed, and the
    loaders' and stage's own errors.
    """
    from deepshrink.checkpoint import load_model
    from deepshrink.stages import stage_for

    stage = stage_for(settings)
    device = resolve_device(device)
    loaded, source = load_model(checkpoint, model)
    name = model if isinstance(model, str) else source.model_name or type(loaded).__name__.lower()
    structure = source.metadata.get(STRUCTURE_KEY)
    if stage.changes_architecture and structure:
        raise ConfigError(f"{checkpoint} is already factored; start from the unfactored model")
    loaders = Loaders.from_splits(data)
    reference_accuracy = evaluate(loaded, loaders.test, device).accuracy
    context = StageContext(loaders, seed=seed, device=device, progress=progress)
    if stage.changes_model:
        result = run_stage(loaded, settings, context)
        accuracy = evaluate(loaded, loaders.test, device).accuracy
        metadata = stage_metadata(result, settings, structure=structure)
        metadata |= {"reference_test_accuracy": reference_accuracy, "test_accuracy": accuracy}
        path = save_checkpoint(out, loaded.cpu(), model_name=name, metadata=metadata, protect=(checkpoint,))
        return StageOnCheckpoint(loaded, result, reference_accuracy, accuracy, Path(path))
    context.output, context.model_name, context.protect = Path(out), name, (checkpoint,)
    context.metadata = {"source": Path(checkpoint).name, **source.metadata}
    result = run_stage(loaded, settings, context)
    accuracy = None
    if evaluate_output:  # the accuracy that counts: of the model decoded from the written file
        from deepshrink.compressed import load_compressed

        # A module the caller passed is copied: the decoded weights must not land in the model itself.
        target = copy.deepcopy(model) if isinstance(model, nn.Module) else model or name
        decoded, _ = load_compressed(out, target)
        accuracy = evaluate(decoded, loaders.test, device).accuracy
    return StageOnCheckpoint(loaded, result, reference_accuracy, accuracy, Path(out))


def _file_stem(name: str) -> str:
    return name.replace(":", "-").replace("/", "-")


def _tradeoff(reference, recipe, loaders, input_key, run_dir, device, progress) -> dict:
    from deepshrink.files import atomic_output
    from deepshrink.tradeoff import tradeoff_curves

    key = _digest(input_key, "tradeoff", recipe.section("tradeoff"), recipe.section("encode"))
    path = run_dir / "stages" / f"tradeoff-{key[:16]}.json"
    if path.exists():
        return json.loads(path.read_text())
    _say(progress, "Figure 6 sweep: pruning only, quantization only, both")
    curves = tradeoff_curves(
        reference, recipe.tradeoff, recipe.encode, loaders, seed=recipe.seed, device=device, progress=progress
    )
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(curves, indent=1))
    return curves


def _say(progress: bool, message: str) -> None:
    if progress:
        tqdm.write(message)
