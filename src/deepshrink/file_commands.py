"""The library behind the commands that measure files: evaluate a checkpoint, predict with and
bench a .dcz file, and a checkpoint's sensitivity to pruning. Paths, names and options in,
results out; nothing is printed (cli.py prints), so each is usable from Python as it is.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deepshrink.data import DataSplits, load_splits, make_loader
from deepshrink.errors import ConfigError, DataError
from deepshrink.inputs import call, describe, inputs_of, is_several, take
from deepshrink.train import (
    INPUT_NAMES_KEY,
    OUTPUT_KEY,
    Evaluation,
    cannot_run,
    check_runs_on,
    evaluate,
    resolve_device,
    select_output,
)


def _split(splits: DataSplits, name: str):
    if name not in ("test", "validation"):
        raise ConfigError(f"split={name!r} should be test or validation")
    return splits.test if name == "test" else splits.validation


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    model: str | None = None,
    data: str | os.PathLike | None = None,
    *,
    validation: float | int | None = None,
    split: str = "test",
    task: str | None = None,
    output: str | None = None,
    device: str = "auto",
) -> tuple[Evaluation, str]:
    """The task's metric and loss of a checkpoint's model on one split of the data.

    Args:
        checkpoint: a .safetensors checkpoint (deepshrink.save_checkpoint).
        model: the architecture, a registered name or package.module:factory (default: the one
            the checkpoint names).
        data: what `load_any` takes (default: the installed data set).
        validation: the validation split, a fraction or a count.
        split: "test" or "validation".
        task: a built-in task name or package.module:function (default classification).
        output: which of several outputs the task scores (a dict key, a tuple index).
        device: "auto", "cpu", "cuda" or "cuda:N".

    Returns:
        (the Evaluation, the model's name).

    Raises:
        DataError: the data has no targets to score against.
        ConfigError, CheckpointError, ModelError: from the pieces above.
    """
    from deepshrink.checkpoint import load_model

    built, loaded = load_model(checkpoint, model)
    select_output(built, output)
    splits = load_splits(data, validation)
    if not splits.labelled:
        raise DataError(
            f"{splits.name} has no targets (no y): evaluate scores outputs against them. `deepshrink predict` runs "
            "a file on inputs alone; run, prune, quantize and sensitivity make targets from the model's own outputs"
        )
    rows = _split(splits, split)
    check_runs_on(built, inputs_of(rows), resolve_device(device))
    return evaluate(built, make_loader(rows, 1000, shuffle=False), device, task), model or loaded.model_name


@dataclass(frozen=True)
class Prediction:
    """What `predict_file` measured: the split, how many examples, how long, and the metric
    (None for data without targets, which is only timed)."""

    split: str
    count: int
    seconds: float
    evaluation: Evaluation | None

    @property
    def throughput(self) -> float:
        """Examples per second (infinite when no time was measured)."""
        return self.count / self.seconds if self.seconds > 0 else float("inf")


def predict_file(
    path: str | os.PathLike,
    model: str | None = None,
    data: str | os.PathLike | None = None,
    *,
    validation: float | int | None = None,
    split: str = "test",
    batch_size: int = 1,
    mode: str | dict[str, str] = "auto",
    task: str | None = None,
    output: str | None = None,
    max_decoded_bytes: int | None = None,
) -> Prediction:
    """Run a .dcz file's model from its compressed form (`load_runtime`) over one split, timed.

    Args:
        path: the .dcz file.
        model: the architecture (default: the one the file names).
        data: what `load_any` takes (default: the installed data set).
        validation: the validation split, a fraction or a count.
        split: "test" or "validation".
        batch_size: examples per call.
        mode: load_runtime's mode ("auto", "sparse", "dense", or {layer glob: mode}).
        task: default the task the file records.
        output: which of several outputs the task scores; default the one the file records.
        max_decoded_bytes: see `load_compressed`.

    Returns:
        A Prediction.

    Raises:
        FormatError: a malformed file (found before the data is read).
        ConfigError: a bad mode, split or argument (from `load_runtime` and the data).
        DataError: data that cannot be read or split.
        ModelError: the data's examples are not what the model takes.
    """
    from deepshrink.compressed import inspect_header
    from deepshrink.runtime.load import load_runtime

    _, checked = inspect_header(path, max_decoded_bytes)  # a malformed file fails before the data loads
    splits = load_splits(data, validation)
    rows = _split(splits, split)
    inputs = inputs_of(rows)
    if is_several(inputs):
        # Convolutions are timed on their input size only for a model of one input tensor.
        runtime = load_runtime(path, model, mode=mode, max_decoded_bytes=max_decoded_bytes)
    else:
        try:
            runtime = load_runtime(
                path,
                model,
                mode=mode,
                max_decoded_bytes=max_decoded_bytes,
                input_shape=tuple(inputs.shape[1:]),  # so that auto mode times convolutions on this size
                input_dtype=str(inputs.dtype).removeprefix("torch."),
            )
        except ConfigError as error:  # the shape came from the data, not from an --input-shape to correct
            if not isinstance(error.__cause__, (RuntimeError, ValueError, IndexError)):
                raise
            raise cannot_run(describe(inputs[:1]), "the data's first example", error.__cause__) from error
    select_output(runtime, output or checked.metadata.get(OUTPUT_KEY))
    check_runs_on(runtime, inputs, "cpu")
    loader = make_loader(rows, batch_size, shuffle=False)
    started = time.perf_counter()
    if not splits.labelled:  # nothing to score against: time the model on the inputs alone
        with torch.no_grad():
            for (batch,) in loader:
                call(runtime, batch)
        return Prediction(split, len(rows), time.perf_counter() - started, None)
    result = evaluate(runtime, loader, "cpu", task or checked.metadata.get("task"))
    return Prediction(split, len(rows), time.perf_counter() - started, result)


@dataclass(frozen=True)
class Bench:
    """What `bench_file` measured: latency per batch size (dense against compressed), the
    memory each keeps, and optionally each compressed layer alone."""

    model_name: str | None
    input_shape: tuple[int, ...] | None
    rows: list[dict]
    residency: str
    layer_rows: list[dict] | None
    inputs: str = ""  # what it was timed on, for the printout


def bench_file(
    path: str | os.PathLike,
    model: str | None = None,
    *,
    mode: str | dict[str, str] = "auto",
    batches: tuple[int, ...] = (1, 8, 64),
    repeats: int = 100,
    input_shape: tuple[int, ...] | None = None,
    layers: bool = False,
    max_decoded_bytes: int | None = None,
    data: str | os.PathLike | None = None,
    validation: float | int | None = None,
) -> Bench:
    """Latency of a .dcz file's model from its compressed form against the dense decoded model,
    interleaved, per batch size (runtime/bench.py).

    Args:
        path: the .dcz file.
        model: the architecture (default: the one the file names).
        mode: load_runtime's mode.
        batches: batch sizes to time.
        repeats: timed calls per batch size.
        input_shape: one example's shape (default: the one the file records).
        layers: also time each layer alone, every weight layer compressed, at the first batch size.
        max_decoded_bytes: see `load_compressed`.
        data: time on this data's first test examples (what `load_any` takes) instead of inputs
            made up from the shape: needed for a model that takes several inputs.
        validation: the data's validation split, a fraction or a count.

    Returns:
        A Bench.

    Raises:
        ConfigError: no input shape given or recorded (and no data), a model of several inputs
            without data, or inputs the model does not take;
        FormatError: a malformed file.
        DataError: data that cannot be read.
    """
    from deepshrink.compressed import load_compressed
    from deepshrink.runtime import bench
    from deepshrink.runtime.load import load_runtime

    dense, metadata = load_compressed(path, model, max_decoded_bytes=max_decoded_bytes)
    dense.eval()
    if data is not None:
        examples = take(inputs_of(load_splits(data, validation).test), slice(0, max(batches)))
        check_runs_on(dense, examples, "cpu")
        shape = None if is_several(examples) else tuple(examples.shape[1:])
        timed_on = f"the data's {describe(examples)}"
    else:
        names = metadata.get(INPUT_NAMES_KEY)
        if names:
            raise ConfigError(
                f"{path}: the model takes several inputs ({', '.join(names)}), and bench can make up only one input "
                "tensor: time it on real inputs, with --data DATA (data=...)"
            )
        recorded = metadata.get("input_shape")
        if input_shape is None and recorded is None:
            raise ConfigError(f"{path} does not record its input shape; pass input_shape (--input-shape), e.g. 1 28 28")
        shape = tuple(input_shape or recorded)  # load_runtime checks that the model takes it
        generator = torch.Generator().manual_seed(0)
        examples = bench.example_inputs(max(batches), shape, metadata.get("input_dtype", "float32"), generator)
        timed_on = f"made-up inputs of shape {shape}"
    compressed = load_runtime(path, model, mode=mode, max_decoded_bytes=max_decoded_bytes, input_shape=shape)
    rows = bench.latency_table(dense, compressed, shape, batches, repeats=repeats, examples=examples)
    layer_rows = None
    if layers:
        every = load_runtime(path, model, mode="sparse", max_decoded_bytes=max_decoded_bytes)
        layer_rows = bench.layer_latency_table(dense, every, shape, batches[0], repeats, examples=examples)
    residency = bench.format_residency(dense, compressed)
    return Bench(metadata.get("model"), shape, rows, residency, layer_rows, timed_on)


@dataclass(frozen=True)
class SensitivityRun:
    """A checkpoint's sensitivity and where its plot and JSON were written."""

    result: object  # prune.sensitivity.SensitivityResult
    plot: Path
    table: Path
    model_name: str
    targets_from_the_model: bool = False  # the data had none: measured against the model's own outputs


def sensitivity_of_checkpoint(
    checkpoint: str | os.PathLike,
    model: str | None = None,
    data: str | os.PathLike | None = None,
    *,
    out_dir: str | os.PathLike = ".",
    validation: float | int | None = None,
    layers: list[str] | None = None,
    task: str | None = None,
    output: str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> SensitivityRun:
    """Each layer pruned alone to a range of sparsities, the task's metric on the validation
    split each time; the plot and JSON written to `out_dir` (sensitivity.png, sensitivity.json).

    Args:
        checkpoint: a .safetensors checkpoint (deepshrink.save_checkpoint).
        model: the architecture (default: the one the checkpoint names).
        data: what `load_any` takes (default: the installed data set).
        out_dir: where the plot and the JSON go.
        validation: the validation split, a fraction or a count.
        layers: layer globs (default: every compressible weight).
        task: a built-in task name or package.module:function (default classification).
        output: which of several outputs the task scores (a dict key, a tuple index).
        device: "auto", "cpu", "cuda" or "cuda:N".
        progress: a progress bar on a terminal.

    Returns:
        A SensitivityRun.

    Raises:
        ConfigError, DataError, CheckpointError, ModelError; OutputError for files that cannot
        be written.
    """
    from deepshrink.checkpoint import load_model
    from deepshrink.prune.sensitivity import sensitivity_analysis, write_sensitivity_json
    from deepshrink.report.figures import plot_sensitivity

    built, loaded = load_model(checkpoint, model)
    select_output(built, output)
    splits = load_splits(data, validation)
    check_runs_on(built, inputs_of(splits.validation), resolve_device(device))
    labelled = splits.labelled
    if not labelled:  # each layer's pruning then measured as agreement with the original
        from deepshrink.pipeline import with_targets_from
        from deepshrink.tasks import resolve_task

        splits = with_targets_from(splits, built, resolve_task(task), resolve_device(device))
    result = sensitivity_analysis(
        built,
        make_loader(splits.validation, 1000, shuffle=False),
        layers,
        device=device,
        task=task,
        progress=progress,
    )
    name = model or loaded.model_name
    out_dir = Path(out_dir)
    plot = plot_sensitivity(
        result, out_dir / "sensitivity.png", title=f"{name}: {result.metric_name} against sparsity per layer"
    )
    table = write_sensitivity_json(result, out_dir / "sensitivity.json")
    return SensitivityRun(result, Path(plot), table, name, targets_from_the_model=not labelled)
