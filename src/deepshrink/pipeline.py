"""The one place the stages are composed: the reference, then every registered stage the recipe
names, in the registry's order (low-rank, prune, quantize, encode), then the report.

Each stage's result is cached in the run directory under a key that covers the stage's recipe
section and everything that fed it (the reference's weights, the data, the seed, the previous
stage's key), so a rerun of the same recipe skips finished stages and a changed section redoes
that stage and the ones after it. Every file is written atomically: interrupting a run at any
point leaves the finished stages on disk and no half-written file.

The accuracy reported as "compressed" is measured on the model decoded from the written .dcz
file, never on the model in memory.

Under a process group (torchrun) every rank runs this same sequence on its shard of the data
(`deepshrink.distributed`): a cache is used only when every rank finds it, each stage's state is
checked equal on every rank (rank 0's is broadcast where it is not), only rank 0 writes the
run directory, and every other rank writes the run's file into a private temporary directory,
so that each evaluates the file it decoded and the files' bytes are compared across ranks.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from deepshrink import distributed
from deepshrink import inputs as batch_inputs
from deepshrink.checkpoint import load_checkpoint, load_state_into, save_checkpoint
from deepshrink.data import DataSplits, load_any, load_arrays
from deepshrink.encode.sizes import parameter_bytes
from deepshrink.errors import ConfigError, ModelError
from deepshrink.files import atomic_output
from deepshrink.layers import SUPPORTED_TYPES, check_weights, compressible_weights, unwrapped
from deepshrink.loading import STRUCTURE_KEY
from deepshrink.plan import Plan
from deepshrink.recipe import Recipe, load_recipe, recipe_from_dict
from deepshrink.stages import Loaders, StageContext, StageResult, registered_stages, run_stage, stage_metadata
from deepshrink.tasks import Task, resolve_task
from deepshrink.teachers import TeacherSettings
from deepshrink.train import (
    INPUT_NAMES_KEY,
    OUTPUT_KEY,
    FirstExamples,
    check_runs_on,
    evaluate,
    inputs_and_targets,
    one_tensor,
    resolve_device,
    select_output,
)


@dataclass
class StageRun:
    """One stage of a run: its cache key, whether it came from the cache, and its result."""

    name: str
    key: str
    cached: bool
    seconds: float
    result: StageResult

    def to_dict(self) -> dict:
        """The stage's record in the run's JSON report.

        Returns:
            {"name", "key", "cached", "seconds", "log", "metrics"}.
        """
        return {"name": self.name, "key": self.key, "cached": self.cached, "seconds": self.seconds} | {
            "log": self.result.log,
            "metrics": self.result.metrics,
        }


@dataclass
class RunResult:
    """What `run` produced: the file, the task's metric before and after (after: of the model
    decoded from the file) on the test split, and the report's data."""

    path: Path
    run_dir: Path
    model_name: str
    reference_metric: float | None  # None: run without data
    compressed_metric: float | None  # of the model decoded from `path`
    file_bytes: int
    parameter_bytes: int
    stages: list[StageRun]
    report: dict = field(default_factory=dict)
    data_name: str = "your data"  # the data set's directory or file name, or "your data" for your loaders
    task: str = "classification"
    metric_name: str = "top-1 accuracy"
    higher_is_better: bool = True
    # "test", or "validation" for data without a test split; "from the original model" marks targets made from it.
    evaluated_on: str = "test"
    targets: str = "given"
    plan: Plan | None = None  # the per-layer settings a recipe's target chose
    processes: int = 1  # how many processes retrained (torchrun), each on its shard of the data
    # The teacher distillation retrained against, where it was not the reference: {"members": how
    # many models it averages (None: run()'s own teacher), "metric": its test metric}.
    teacher: dict | None = None

    @property
    def ratio(self) -> float:
        """The fp32 parameter bytes over the file's bytes."""
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
    """A content hash of a model's state_dict: the identity of a stage's input (the same hash
    the ranks of a distributed run compare).

    Args:
        model: the model.

    Returns:
        The sha256 in hex.
    """
    return distributed.state_digest(model).hex()


# torch.nn.utils.weight_norm and spectral_norm of old: forward pre-hooks that rebuild `weight` from
# other parameters before every call, and the code that takes each off keeping the weight. torch's
# remove_spectral_norm leaves its load_state_dict pre-hook behind (the module then asks any state
# dict for weight_orig and weight_u), so that fix clears it too.
_WEIGHT_HOOKS = {
    "WeightNorm": "torch.nn.utils.remove_weight_norm(model.get_submodule({name!r}))",
    "SpectralNorm": "torch.nn.utils.remove_spectral_norm(model.get_submodule({name!r})); "
    "model.get_submodule({name!r})._load_state_dict_pre_hooks.clear()",
}


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise ModelError(f"run() needs a torch.nn.Module, got {type(model).__name__}")
    check_weights(model)  # first: a TorchScript module cannot even be searched for weights
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            kind = type(hook).__name__ if type(hook).__module__.startswith("torch.nn") else None
            if kind in _WEIGHT_HOOKS:
                function = "weight_norm" if kind == "WeightNorm" else "spectral_norm"
                raise ModelError(
                    f"{name or 'the model'} computes its weight with torch.nn.utils.{function} before every call, "
                    "and deepshrink compresses plain weights: remove it first, keeping the weight's value, with "
                    f"{_WEIGHT_HOOKS[kind].format(name=name)}, and load the file into the model built without it"
                )
    if not compressible_weights(model):
        quantized = any(type(module).__module__.startswith("torch.ao.nn.quantized") for module in model.modules())
        hint = "; its layers are torch.ao's quantized ones: pass the float model they were made from"
        raise ModelError(
            f"{type(model).__name__} has no layer deepshrink compresses ({SUPPORTED_TYPES}); "
            f"there is nothing to compress{hint if quantized else ''}"
        )
    foreign = [
        (f"{name}.{tensor}" if name else tensor, type(parametrization).__name__)
        for name, module in model.named_modules()
        for tensor, parametrizations in getattr(module, "parametrizations", {}).items()
        for parametrization in parametrizations
        if not type(parametrization).__module__.startswith("deepshrink.")
    ]
    if foreign:
        key, kind = foreign[0]
        module, _, tensor = key.rpartition(".")
        raise ModelError(
            f"{key} is computed by a parametrization ({kind}: weight_norm, spectral_norm or your own), and "
            "deepshrink compresses plain weights: remove it first, keeping the weight's value, with "
            f"torch.nn.utils.parametrize.remove_parametrizations(model.get_submodule({module!r}), {tensor!r}), "
            "and load the file into the model built without it"
        )
    parametrized = [name for name, module in model.named_modules() if hasattr(module, "parametrizations")]
    if parametrized:
        raise ModelError(
            f"the model passed to run() is already pruned or shared ({', '.join(parametrized[:3])}); "
            "pass the trained reference, or run single stages with deepshrink.run_stage"
        )


@dataclass
class _Data:
    """The run's loaders and what the report and the cache key say about them."""

    loaders: Loaders
    key: list
    name: str
    evaluated_on: str = "test"
    targets: str = "given"
    input_shape: tuple[int, ...] | None = None
    input_dtype: str = "float32"
    input_names: tuple[str, ...] | None = None
    splits: DataSplits | None = None  # the splits behind the loaders, where they came as a DataSplits

    def metadata(self) -> dict:
        """What a written file records about the model's inputs, so that bench needs no flags."""
        return input_metadata(self.input_shape, self.input_dtype, self.input_names)


def input_metadata(shape: tuple[int, ...] | None, dtype: str, names: tuple[str, ...] | None = None) -> dict:
    """The input shape, and the dtype where it is not float32 (files of float models keep
    the bytes they had before the dtype was recorded); for a model that takes several inputs,
    their names instead (INPUT_NAMES_KEY).

    Args:
        shape: one input example's shape, or None when unknown.
        dtype: the inputs' dtype name, e.g. "float32" or "int64".
        names: the several inputs' keywords or positions, or None for one input tensor.

    Returns:
        The metadata entries (none without a shape or names).
    """
    if names:
        return {INPUT_NAMES_KEY: list(names)}
    recorded = {"input_shape": list(shape)} if shape else {}
    return recorded | ({"input_dtype": dtype} if shape and dtype != "float32" else {})


def _prepare_data(
    data: DataSplits | Loaders | Mapping | str | os.PathLike | None,
    recipe: Recipe,
    reference: nn.Module,
    task: Task,
    device,
) -> _Data:
    """Loaders over the user's data; inputs without targets get the reference model's outputs
    made into targets by the task (the label-free path: retraining reproduces the original).
    No data at all (None): no loaders, and the stages work without retraining."""
    if data is None:
        needs = [name for name in ("lowrank", "tradeoff", "target") if getattr(recipe, name) is not None]
        if needs:
            raise ConfigError(
                f"without data the recipe cannot run {', '.join(needs)}: each measures the model on data; "
                "give data, or leave them out (prune and quantize run without retraining)"
            )
        return _Data(None, ["no data"], "no data", evaluated_on="nothing", targets="none")
    if isinstance(data, Loaders):
        inputs = _inputs_of(next(iter(data.validation)))
        if inputs is not None:  # other batches are named by the first evaluation (`fit`'s batch check)
            check_runs_on(reference, inputs, device)
        names = tuple(name for name, _ in batch_inputs.tensors(inputs)) if inputs is not None else ()
        several = inputs is not None and batch_inputs.is_several(inputs)
        return _Data(data, ["user loaders"], "your data", input_names=names if several else None)
    if isinstance(data, Mapping):  # the arrays themselves, split as `deepshrink run --data FILE` splits a file
        data = load_arrays(data, 0.1, seed=0, train_subset=recipe.data.train_subset)
    elif isinstance(data, str | os.PathLike):  # what `deepshrink run --data` takes
        data = load_any(data, seed=0, train_subset=recipe.data.train_subset)
        if isinstance(data, Loaders):
            return _prepare_data(data, recipe, reference, task, device)
    if not isinstance(data, DataSplits):
        raise ConfigError(
            "data should be a DataSplits (deepshrink.load_data() or load_arrays()), Loaders, a dict of "
            f"arrays or a path, got {type(data).__name__}"
        )
    check_runs_on(reference, batch_inputs.inputs_of(data.train), device)
    targets = "given"
    if not data.labelled:
        data = with_targets_from(data, reference, task, device)
        targets = "from the original model"
    return _Data(
        Loaders.from_splits(data, recipe.data.test_subset),
        [data.fingerprint, len(data.train), recipe.data.test_subset],
        data.name,
        "validation" if data.test_is_validation else "test",
        targets,
        data.input_shape,
        data.input_dtype,
        data.input_names,
        data,
    )


def _inputs_of(batch) -> batch_inputs.Inputs | None:
    """A batch's inputs (`train.inputs_and_targets`); None for a batch of another form."""
    try:
        return inputs_and_targets(batch)[0]
    except ConfigError:
        return None


@torch.no_grad()
def with_targets_from(data: DataSplits, model: nn.Module, task: Task, device="cpu") -> DataSplits:
    """`data` with targets made by `task.targets_from_outputs` from `model`'s outputs, for data
    that has inputs only.

    Args:
        data: splits with inputs only.
        model: the trained model whose outputs become the targets.
        task: the task (its `targets_from_outputs`).
        device: where to run `model`.

    Returns:
        New splits with targets.
    """
    model = model.to(device).eval()

    def labelled(split):
        inputs = batch_inputs.inputs_of(split)
        outputs = []
        for start in range(0, batch_inputs.count(inputs), 1000):
            part = batch_inputs.to_device(batch_inputs.take(inputs, slice(start, start + 1000)), device)
            outputs.append(task.targets_from_outputs(one_tensor(batch_inputs.call(model, part))).cpu())
        return batch_inputs.in_memory(inputs, torch.cat(outputs))

    validation = labelled(data.validation)
    test = validation if data.test_is_validation else labelled(data.test)
    return dataclasses.replace(data, train=labelled(data.train), validation=validation, test=test)


def _retraining_mode(policy: str) -> str:
    """How BatchNorm behaves while stages retrain, for a recipe's policy: frozen, unless the
    policy is to train or recalibrate it (a fold happens later, so until then it is frozen)."""
    return policy if policy in ("train", "recalibrate") else "freeze"


def _check_recipe_layers(recipe: Recipe, reference: nn.Module) -> None:
    """Every layer glob in the recipe selects something in the model (lowrank's factors count)."""
    weights = compressible_weights(reference)
    layer_names = list(weights)
    if recipe.lowrank is not None:  # a factored layer NAME becomes NAME.0 and NAME.1
        layer_names += [f"{name}.{part}" for name in layer_names for part in (0, 1)]
    recipe.check_layers(layer_names, [text for weight in weights.values() for text in (weight.key, weight.module_name)])


def _model_stage(
    stage, settings, context: StageContext, current, reference, key: str, path: Path, name: str, architecture: dict
):
    """A stage that changes the model: its cached checkpoint and result when `path` holds them,
    else run on a copy (the reference stays untouched for the report and the sweep) and saved.
    Returns (the model after it, its StageResult, whether it was cached)."""
    result_path = path.with_suffix(".result.safetensors")
    if distributed.all_ranks(path.exists() and result_path.exists()):
        current = load_state_into(copy.deepcopy(reference), load_checkpoint(path), path).to(context.device)
        distributed.synchronize(current, f"loading the cached {stage.name} stage")
        return current, StageResult.load(result_path), True
    _say(context.progress, f"{stage.name}: running")
    current = copy.deepcopy(reference) if current is reference else current
    result = run_stage(current, settings, context)
    if distributed.synchronize(current, f"the {stage.name} stage"):
        result.log["processes"] = "the processes' results differed; rank 0's were broadcast to every rank"
    if distributed.is_main_process():
        metadata = stage_metadata(result, settings, key=key, architecture=architecture)
        save_checkpoint(path, current, model_name=name, metadata=metadata)
        result.save(result_path)
    return current, result, False


def _file_metadata(key: str, recipe: Recipe, task: Task, architecture: dict, prepared: _Data) -> dict:
    """What the run's file records: its cache key, the recipe, the task, the architecture's
    changes (low-rank structure, folded BatchNorm) and the inputs' shape."""
    from deepshrink.batchnorm import FOLDED_KEY

    metadata = {
        "stage_key": key,
        "recipe": recipe.to_dict(),
        "task": task.name,
        STRUCTURE_KEY: architecture.get(STRUCTURE_KEY),
    }
    metadata |= {FOLDED_KEY: architecture[FOLDED_KEY]} if architecture.get(FOLDED_KEY) else {}
    metadata |= {OUTPUT_KEY: recipe.output} if recipe.output is not None else {}
    return metadata | prepared.metadata()


def _planned(
    recipe: Recipe, model, loaders: Loaders, task, device, input_key, run_dir, progress, metadata, reference=None
) -> tuple[Recipe, Plan | None]:
    """The recipe with its target turned into per-layer settings (plan.py), and the plan; a
    recipe without a target as it is, and None. The plan is kept in the run directory.

    Planned from the reference `model` before every stage, or, for a recipe whose pruning learns
    its sparsities (`recipe.plans_after_pruning`), from the pruned `model` before the quantize
    stage, with the unpruned `reference` for the metric's starting point. `metadata` is about
    what the file's header will record, for the size of a ratio target."""
    if recipe.target is None:
        return recipe, None
    from deepshrink.plan import Plan, plan_settings

    path = Path(run_dir) / "stages" / f"plan-{_digest(input_key, recipe.to_dict())[:16]}.json"
    if distributed.all_ranks(path.exists()):
        plan = Plan.from_dict(json.loads(path.read_text()))
        _say(progress, f"target: cached ({path.name})")
    else:
        _say(progress, "target: measuring each layer's sensitivity on the validation split")

        def folded(model: nn.Module) -> nn.Module:  # the pipeline shares weights with BatchNorm folded
            _fold(model, loaders, device)
            return model

        after_pruning = reference is not None
        # Each rank's loader holds every N-th example: together they make the first `examples`.
        validation = FirstExamples(loaders.validation, -(-recipe.target.examples // distributed.world_size()))
        plan = plan_settings(
            model,
            validation,
            task,
            recipe.target,
            prune=recipe.prune is not None and not after_pruning,
            quantize=recipe.quantize is not None,
            encode_settings=recipe.encode,
            device=device,
            seed=recipe.seed,
            progress=progress,
            # After pruning the quantize stage's model is already folded.
            before_sharing=folded if recipe.batchnorm == "fold" and not after_pruning else None,
            reference_metric=evaluate(reference, validation, device, task).metric if after_pruning else None,
            file_metadata=metadata,
        )
        if distributed.is_main_process():
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(path) as temporary:
                temporary.write_text(json.dumps(plan.to_dict(), indent=2))
    return recipe.with_plan(plan), plan


def _fold(reference: nn.Module, loaders: Loaders, device) -> list:
    """Fold the reference's BatchNorm layers into the layers before them, in place, checking on
    a validation batch that the outputs stay the same; returns the pairs folded."""
    from deepshrink.batchnorm import fold_batchnorm, foldable_pairs

    pairs = foldable_pairs(reference)
    if not pairs:
        return []
    inputs, _ = inputs_and_targets(next(iter(loaders.validation)))
    inputs = batch_inputs.to_device(batch_inputs.take(inputs, slice(0, 64)), device)
    reference.eval()
    with torch.no_grad():
        before = one_tensor(batch_inputs.call(reference, inputs))
        folded = fold_batchnorm(reference, pairs)
        after = one_tensor(batch_inputs.call(reference, inputs))
    scale = before.abs().max().clamp_min(1.0)
    if not torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(scale)):
        # A pair that looked foldable in the graph but is not (say, a Linear on a sequence
        # followed by a BatchNorm over another axis).
        raise ModelError(
            "folding BatchNorm into the layers before it changed the model's outputs "
            f"(largest difference {float((after - before).abs().max()):.3g}); set `batchnorm: freeze` in the recipe"
        )
    return folded


def run(
    model: nn.Module,
    recipe: Recipe | str | os.PathLike | dict,
    data: DataSplits | Loaders | Mapping | str | os.PathLike | None,
    *,
    run_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    task: Task | str | None = None,
    device: str = "auto",
    progress: bool = True,
    teacher: nn.Module | None = None,
) -> RunResult:
    """Run `recipe` on a trained `model`: every stage it names, in order, then RUN_DIR/MODEL.dcz
    and the report (`deepshrink run RECIPE` on the command line).

    Args:
        model: the trained reference; never modified. A model inside torch.compile's,
            DataParallel's or DistributedDataParallel's wrapper is compressed as the model inside,
            so the file loads into the plain model.
        recipe: a Recipe, a YAML file, a shipped recipe's name ("lenet-5") or a dict.
        data: a DataSplits (from deepshrink.load_data or load_arrays; inputs without targets
            get targets from the model's own outputs), the arrays themselves ({"x": ..., "y": ...},
            as `load_arrays` takes them: 10% of `x` held out for validation, seed 0), a path as
            `deepshrink run --data` takes it (an array file, a directory of IDX files,
            package.module:function) or your own loaders
            (`deepshrink.Loaders.fixed(train, validation, test)`; cached stages then assume the
            same data on a rerun), or None: no data, so pruning and sharing run without
            retraining, nothing is measured, and the report says so.
        run_dir: where stage checkpoints, the file and the report go (default runs/MODEL).
        model_name: the name recorded in the file (default: the recipe's model, or the class name).
        task: the Task, or a built-in name, or package.module:function; default the recipe's
            `task`, else classification.
        device: "auto", "cpu", "cuda" or "cuda:N".
        progress: progress bars and one line per stage.
        teacher: the model that the stages' distillation retrains against, in place of `model`
            (e.g. a `deepshrink.teachers.Ensemble` of several trained copies); it takes the same
            inputs and gives outputs of the same shape. Default: the recipe's `teacher`
            section, else `model`.

    Under an initialised process group (torchrun, or `torch.distributed.init_process_group`)
    call `run` on every rank with the same arguments: each retrains on its shard of the data
    (a DataSplits is sharded for you; your own Loaders must shard themselves), and rank 0
    writes the run directory and the report.

    Returns:
        A RunResult: the file, its size against fp32 parameters, and the task's metric of the
        reference and of the model decoded from the file.

    Raises:
        ConfigError: a bad recipe, task or data argument, a run directory that is a file, or a
            `teacher` given both here and in the recipe, or to a recipe in which no stage distills.
        ModelError: a model with nothing to compress, or one no stage can work on (a foreign
            parametrization, weights that are not float32, a forward that needs several inputs
            or returns several outputs, data it cannot run on).
        UnsupportedLayerError: a weight tied to a tensor no stage compresses (ties between
            compressible weights are compressed as one tensor).
        DataError: targets that do not fit the task.
    """
    recipe = _as_recipe(recipe)
    model = unwrapped(model)
    _check_model(model)
    progress = progress and distributed.is_main_process()
    task = resolve_task(task if task is not None else recipe.task)
    name = model_name or recipe.model or type(model).__name__.lower()
    run_dir = Path(run_dir or Path("runs") / _file_stem(name))
    if run_dir.exists() and not run_dir.is_dir():  # found now, not after the first stage's retraining
        raise ConfigError(f"run_dir {str(run_dir)!r} is a file; give a directory (it is made if missing)")
    device = resolve_device(device)
    # A model that returns several outputs gives the one the recipe names, in every copy made of it.
    reference = select_output(copy.deepcopy(model).to(device).eval(), recipe.output)
    prepared = _prepare_data(data, recipe, reference, task, device)
    loaders = prepared.loaders
    reference_metric = evaluate(reference, loaders.test, device, task).metric if loaders is not None else None
    _check_recipe_layers(recipe, reference)
    teacher = _teacher(teacher, recipe, reference, name, prepared, device, progress)
    input_key = _digest(weights_digest(reference), prepared.key, recipe.seed, task.name, recipe.batchnorm)
    if teacher is not None:  # a rerun with another teacher retrains; runs without one keep their keys
        input_key = _digest(input_key, "teacher", weights_digest(teacher))
    retraining = _retraining_mode(recipe.batchnorm)
    # The header the file will have, with a key of the real one's length: hundreds of bytes that
    # a ratio target on a small model must count.
    metadata = _file_metadata("0" * len(input_key), recipe, task, {}, prepared)
    plan = None
    if not recipe.plans_after_pruning:
        recipe, plan = _planned(recipe, reference, loaders, task, device, input_key, run_dir, progress, metadata)

    def planned_after_pruning(recipe: Recipe, pruned: nn.Module, key: str):
        return _planned(recipe, pruned, loaders, task, device, key, run_dir, progress, metadata, reference=reference)

    context = StageContext(
        loaders,
        seed=recipe.seed,
        device=device,
        progress=progress,
        task=task,
        batchnorm=retraining,
        teacher=teacher if teacher is not None else reference,
    )
    with _file_directory(run_dir) as directory:
        stages_run, current, out, recipe, late_plan = _run_stages(
            recipe, reference, context, input_key, name, prepared, run_dir, directory, planned_after_pruning
        )
        plan = plan or late_plan
        # The metric that counts: decode the file that was written into a fresh copy of the model.
        from deepshrink.compressed import load_compressed

        decoded = select_output(load_compressed(out, copy.deepcopy(model))[0], recipe.output)
        compressed_metric = evaluate(decoded, loaders.test, device, task).metric if loaders is not None else None
        distributed.check_same_file(out, f"files ({out.name})")
        file_bytes = out.stat().st_size

    tradeoff = None
    if recipe.tradeoff is not None:
        tradeoff = _tradeoff(reference, recipe, loaders, input_key, run_dir, device, progress, task, retraining)

    from deepshrink.report import write_report

    result = RunResult(
        path=run_dir / out.name,
        run_dir=run_dir,
        model_name=name,
        reference_metric=reference_metric,
        compressed_metric=compressed_metric,
        file_bytes=file_bytes,
        parameter_bytes=parameter_bytes(model),
        stages=stages_run,
        data_name=prepared.name,
        task=task.name,
        metric_name=task.metric.name,
        higher_is_better=task.metric.higher_is_better,
        evaluated_on=prepared.evaluated_on,
        targets=prepared.targets,
        plan=plan,
        processes=distributed.world_size(),
        teacher=_teacher_record(teacher, recipe, loaders, device, task),
    )
    if distributed.is_main_process():
        result.report = write_report(result, recipe, current.cpu(), tradeoff)
    return result


def _teacher(
    given: nn.Module | None, recipe: Recipe, reference: nn.Module, name: str, prepared: _Data, device, progress: bool
) -> nn.Module | None:
    """The teacher distillation retrains against when it is not the reference: `run`'s argument
    or the recipe's section (teachers.py); None for the reference."""
    if given is not None and recipe.teacher is not None:
        raise ConfigError("a teacher was given to run() and in the recipe's teacher section: keep one")
    if given is not None and not recipe.distills:
        raise ConfigError(
            "a teacher was given to run(), but no stage of the recipe distills, so none would use it: add "
            "`distill: {temperature: 4.0, alpha: 0.5}` to the prune (or quantize, lowrank) section"
        )
    if given is not None:
        return select_output(copy.deepcopy(unwrapped(given)).to(device).eval(), recipe.output)
    if recipe.teacher is None:
        return None
    from deepshrink.teachers import build_teacher

    _say(progress, f"teacher: the mean of {recipe.teacher.members} models (the reference and more trained copies)")
    ensemble = build_teacher(
        recipe.teacher,
        reference,
        name,
        prepared.splits,
        prepare=lambda member: select_output(member, recipe.output),
        device=device,
        progress=progress,
    )
    return ensemble.to(device)


def _teacher_record(
    teacher: nn.Module | None, recipe: Recipe, loaders: Loaders | None, device, task: Task
) -> dict | None:
    """What the report says about a teacher other than the reference: what it is and its test metric."""
    if teacher is None:
        return None
    members = recipe.teacher.members if recipe.teacher is not None else None
    metric = evaluate(teacher, loaders.test, device, task).metric if loaders is not None else None
    return {"members": members, "metric": metric}


@contextlib.contextmanager
def _file_directory(run_dir: Path):
    """Where this process writes the run's file: the run directory on rank 0 (or alone), a
    private temporary directory, removed afterwards, on every other rank."""
    if distributed.is_main_process():
        yield run_dir
        return
    private = Path(tempfile.mkdtemp(prefix=f"deepshrink-rank{distributed.rank()}-"))
    try:
        yield private
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _run_stages(
    recipe: Recipe,
    reference: nn.Module,
    context: StageContext,
    input_key: str,
    name: str,
    prepared: _Data,
    run_dir: Path,
    file_directory: Path,
    planned_after_pruning: Callable[[Recipe, nn.Module, str], tuple[Recipe, Plan | None]],
) -> tuple[list[StageRun], nn.Module, Path, Recipe, Plan | None]:
    """Every registered stage the recipe names, in order, each from its cache when the run
    directory holds it; the run's file goes to `file_directory`. A target left for after
    pruning (`recipe.plans_after_pruning`) is planned by `planned_after_pruning` just before
    the stage marked `planned_late` (weight sharing). Returns the stages' runs, the model
    after the last stage that changes it, the file written, the recipe as planned and the
    plan made here (or None)."""
    from deepshrink.batchnorm import FOLDED_KEY

    architecture: dict = {}
    stages_run: list[StageRun] = []
    current = reference
    key = input_key
    out = plan = None
    for stage in registered_stages():
        if recipe.stages.get(stage.name) is None:
            continue
        # Folding checks the outputs on a validation batch: without data, BatchNorm stays as it is.
        folds = recipe.batchnorm == "fold" and context.loaders is not None
        if stage.after_folding and folds and FOLDED_KEY not in architecture:
            current = copy.deepcopy(reference) if current is reference else current
            architecture[FOLDED_KEY] = _fold(current, context.loaders, context.device)
        if stage.planned_late and recipe.plans_after_pruning:  # the bits, on the pruned and folded model
            recipe, plan = planned_after_pruning(recipe, current, key)
        settings = recipe.stages[stage.name]
        key = _digest(key, stage.name, recipe.section(stage.name))
        context = dataclasses.replace(
            context, output=None, model_name=None, metadata={}, earlier={run.name: run.result for run in stages_run}
        )
        started = time.perf_counter()
        if stage.changes_model:
            path = run_dir / "stages" / f"{stage.name}-{key[:16]}.safetensors"
            current, result, cached = _model_stage(
                stage, settings, context, current, reference, key, path, name, architecture
            )
            if result.structure:  # set by a stage that changes layers (low-rank), for every later load
                architecture[STRUCTURE_KEY] = result.structure
        else:  # a stage that writes the run's file
            path = out = file_directory / f"{_file_stem(name)}{stage.output_suffix}"
            cached = distributed.all_ranks(stage.written_key is not None and stage.written_key(out) == key)
            if cached:
                result = StageResult(stage.name, {"file": out.name}, files=[str(out)])
            else:
                context.output, context.model_name = out, name
                context.metadata = _file_metadata(key, recipe, context.task, architecture, prepared)
                result = run_stage(current, settings, context)
        stages_run.append(StageRun(stage.name, key, cached, time.perf_counter() - started, result))
        _say(
            context.progress,
            f"{stage.name}: {'cached' if cached else 'done'} in {stages_run[-1].seconds:.1f}s ({path.name})",
        )
    return stages_run, current, out, recipe, plan


@dataclass
class StageOnCheckpoint:
    """What `run_stage_on_checkpoint` did: the model after the stage, the stage's result, the
    task's test metric before and after (after: of the decoded file, for a stage that writes
    one) and the file written."""

    model: nn.Module
    result: StageResult
    reference_metric: float | None  # None without data
    metric: float | None
    path: Path
    metric_name: str = "top-1 accuracy"


def run_recipe(
    recipe: str | os.PathLike,
    *,
    model_name: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    validation: float | int | None = None,
    task: str | None = None,
    output: str | None = None,
    run_dir: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = True,
) -> RunResult:
    """`run` from names and paths, as `deepshrink run RECIPE` does: the recipe's model (or
    `model_name`), trained weights from `checkpoint` or the registered model's cached reference,
    and the data in `data` (default: the installed data set).

    Args:
        recipe: a YAML file or a shipped recipe's name.
        model_name: overrides the recipe's model: a registered name or package.module:factory.
        checkpoint: the trained weights to start from; required for a user's factory.
        data: a directory of MNIST-format IDX files (`load_data`), an .npz or .safetensors
            file of arrays (`load_arrays`), package.module:function (`load_any`), or "none":
            no data (pruning and sharing without retraining; needs `checkpoint`).
        validation: the validation split: a fraction or a count (default: 5,000 IDX images, or
            10% of an array file's examples).
        task: overrides the recipe's task (a built-in name or package.module:function).
        output: overrides the recipe's `output` (which of several outputs the task scores).
        run_dir: where stage checkpoints, the file and the report go (default runs/MODEL).
        device: "auto", "cpu", "cuda" or "cuda:N".
        progress: progress bars and one line per stage.

    Returns:
        The RunResult of `run`.

    Raises:
        ConfigError: the recipe names no model, or a user's factory comes without a checkpoint;
        and what `load_recipe`, `load_data`, `load_model`, `reference_model` and `run` raise.
    """
    from deepshrink.checkpoint import load_model
    from deepshrink.models import is_factory_path
    from deepshrink.recipe import load_recipe
    from deepshrink.references import reference_model

    loaded = load_recipe(recipe)
    loaded = dataclasses.replace(loaded, output=output) if output is not None else loaded
    name = model_name or loaded.model
    if name is None:
        raise ConfigError(f"{recipe}: the recipe names no model; add `model: NAME` or pass model_name=NAME")
    no_data = str(data).lower() == "none" if data is not None else False
    if no_data and checkpoint is None:
        raise ConfigError("without data there is no reference to train: pass the trained weights with checkpoint=FILE")
    splits = None if no_data else load_any(data, validation, seed=0, train_subset=loaded.data.train_subset)
    if checkpoint is not None:
        model, _ = load_model(checkpoint, name)
    elif not isinstance(splits, DataSplits):
        raise ConfigError(f"data {data} gives loaders: pass the trained weights with checkpoint=FILE")
    elif is_factory_path(name):
        raise ConfigError(f"model {name} is your own network: pass its trained weights with checkpoint=FILE")
    else:
        model = reference_model(name, splits, device=device, progress=progress).model
    return run(model, loaded, splits, run_dir=run_dir, model_name=name, task=task, device=device, progress=progress)


def run_stage_on_checkpoint(
    checkpoint: str | os.PathLike,
    settings,
    data: DataSplits | None,
    out: str | os.PathLike,
    *,
    model: nn.Module | str | None = None,
    task: Task | str | None = None,
    output: str | None = None,
    batchnorm: str = "fold",
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    evaluate_output: bool = True,
    teacher: TeacherSettings | None = None,
) -> StageOnCheckpoint:
    """One stage on a checkpoint, the same stage a recipe section runs.

    As `deepshrink prune`, `quantize`, `lowrank` and `encode` do: load, run through
    `run_stage`, write `out` (a checkpoint with the same metadata a recipe's stage checkpoint
    has, or the stage's own file), and measure the task's test metric before and after.

    Args:
        checkpoint: the .safetensors checkpoint to start from.
        settings: the stage's settings (e.g. a PruneSettings); they choose the stage.
        data: the data splits, or None (`--data none`): as in a run without data, pruning and
            sharing work without retraining, BatchNorm is not folded and nothing is measured;
            encoding needs none.
        out: the file to write.
        model: overrides the model the checkpoint names (a module, registered name or factory).
        task: as in a recipe (default: the checkpoint's, else classification).
        output: as in a recipe: which of several outputs the task scores (the model is given
            `train.select_output`'s hook, and a written file records it).
        batchnorm: as in a recipe; with "fold", BatchNorm is folded into the layers before it
            ahead of weight sharing and encoding.
        seed: the stage's seed.
        device: "auto", "cpu", "cuda" or "cuda:N".
        progress: progress bars.
        evaluate_output: measure the metric after the stage.
        teacher: as a recipe's `teacher` section: distillation retrains against the mean of the
            checkpoint and more trained copies (None: against the checkpoint alone). Needs a
            stage that distills.

    Returns:
        A StageOnCheckpoint.

    Raises:
        ConfigError: the stage cannot run again on what it already changed, or a teacher for a
            stage that does not distill; and the loaders', the teacher's and the stage's own errors.
    """
    from deepshrink.batchnorm import FOLDED_KEY
    from deepshrink.checkpoint import load_model
    from deepshrink.recipe import BATCHNORM_POLICIES
    from deepshrink.stages import stage_for

    if batchnorm not in BATCHNORM_POLICIES:
        raise ConfigError(f"batchnorm={batchnorm!r} should be one of {', '.join(BATCHNORM_POLICIES)}")
    stage = stage_for(settings)
    if teacher is not None and getattr(settings, "distill", None) is None:
        raise ConfigError(
            f"a teacher was given, but this {stage.name} stage does not distill, so none would use it: add "
            "--distill (distill: {temperature: 4.0, alpha: 0.5} in its settings)"
        )
    if teacher is not None and data is None:
        raise ConfigError("a teacher is what retraining distils from, and without data nothing retrains: drop it")
    task = resolve_task(task)
    device = resolve_device(device)
    loaded, source = load_model(checkpoint, model)
    select_output(loaded, output)
    name = model if isinstance(model, str) else source.model_name or type(loaded).__name__.lower()
    architecture = {key: source.metadata[key] for key in (STRUCTURE_KEY, FOLDED_KEY) if source.metadata.get(key)}
    if stage.changes_architecture and architecture.get(STRUCTURE_KEY):
        raise ConfigError(f"{checkpoint} is already factored; start from the unfactored model")
    loaded.to(device).eval()
    loaders, reference_metric = None, None
    if data is not None:
        check_runs_on(loaded, batch_inputs.inputs_of(data.train), device)  # named before anything runs on it
        if not data.labelled:
            data = with_targets_from(data, loaded, task, device)
        loaders = Loaders.from_splits(data)
        reference_metric = evaluate(loaded, loaders.test, device, task).metric
    retraining = _retraining_mode(batchnorm)
    context = StageContext(loaders, seed=seed, device=device, progress=progress, task=task, batchnorm=retraining)
    teacher_record = None
    if teacher is not None:  # from the checkpoint as it is, before folding or the stage change it
        from deepshrink.teachers import build_teacher

        _say(progress, f"teacher: the mean of {teacher.members} models (the checkpoint and more trained copies)")
        context.teacher = build_teacher(
            teacher,
            loaded,
            name,
            data,
            prepare=lambda member: select_output(member, output),
            device=device,
            progress=progress,
        ).to(device)
        teacher_metric = evaluate(context.teacher, loaders.test, device, task).metric if loaders is not None else None
        teacher_record = {"members": teacher.members, "metric": teacher_metric}
    if stage.after_folding and batchnorm == "fold" and loaders is not None:  # folding checks outputs on data
        folded = _fold(loaded, loaders, device)
        architecture |= {FOLDED_KEY: architecture.get(FOLDED_KEY, []) + folded} if folded else {}
    if stage.changes_model:
        result = run_stage(loaded, settings, context)
        metric = evaluate(loaded, loaders.test, device, task).metric if loaders is not None else None
        metadata = stage_metadata(result, settings, architecture=architecture)
        metadata |= {"task": task.name, "reference_test_metric": reference_metric, "test_metric": metric}
        metadata |= {"teacher": teacher_record} if teacher_record is not None else {}
        path = save_checkpoint(out, loaded.cpu(), model_name=name, metadata=metadata, protect=(checkpoint,))
        return StageOnCheckpoint(loaded, result, reference_metric, metric, Path(path), task.metric.name)
    context.output, context.model_name, context.protect = Path(out), name, (checkpoint,)
    context.metadata = {"source": Path(checkpoint).name, **source.metadata, **architecture, "task": task.name}
    if data is not None:
        context.metadata |= input_metadata(data.input_shape, data.input_dtype, data.input_names)
    context.metadata |= {OUTPUT_KEY: output} if output is not None else {}
    result = run_stage(loaded, settings, context)
    metric = None
    if evaluate_output and loaders is not None:  # the metric that counts: of the model decoded from the written file
        from deepshrink.compressed import load_compressed

        # A module the caller passed is copied: the decoded weights must not land in the model itself.
        target = copy.deepcopy(model) if isinstance(model, nn.Module) else model or name
        decoded = select_output(load_compressed(out, target)[0], output)
        metric = evaluate(decoded, loaders.test, device, task).metric
    return StageOnCheckpoint(loaded, result, reference_metric, metric, Path(out), task.metric.name)


def _file_stem(name: str) -> str:
    return name.replace(":", "-").replace("/", "-")


def _tradeoff(reference, recipe, loaders, input_key, run_dir, device, progress, task, batchnorm) -> dict:
    from deepshrink.files import atomic_output
    from deepshrink.tradeoff import tradeoff_curves

    key = _digest(input_key, "tradeoff", recipe.section("tradeoff"), recipe.section("encode"))
    path = run_dir / "stages" / f"tradeoff-{key[:16]}.json"
    if distributed.all_ranks(path.exists()):
        return json.loads(path.read_text())
    _say(progress, "Figure 6 sweep: pruning only, quantization only, both")
    curves = tradeoff_curves(
        reference,
        recipe.tradeoff,
        recipe.encode,
        loaders,
        seed=recipe.seed,
        device=device,
        task=task,
        batchnorm=batchnorm,
        progress=progress,
    )
    if distributed.is_main_process():
        with atomic_output(path) as temporary:
            temporary.write_text(json.dumps(curves, indent=1))
    return curves


def _say(progress: bool, message: str) -> None:
    if progress:
        tqdm.write(message)
