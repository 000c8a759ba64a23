"""The `deepshrink` command line. It parses arguments and calls the library; nothing more.

Errors from the library's exception hierarchy become one-line messages with a distinct exit
code per kind (see deepshrink.errors); argparse's own usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

from deepshrink import __version__
from deepshrink.errors import ConfigError, DeepshrinkError, InternalError, OutputError
from deepshrink.tasks import BUILT_IN, DEFAULT_TASK

EPILOG = (
    "Exit codes: 0 ok, 2 usage, 3 bad option or config, 4 data not found or unreadable, "
    "5 malformed file, 6 checkpoint problem, 7 model problem, 8 unsupported layer, "
    "9 cannot write or read a path, 70 internal error (a bug: rerun with --debug and report it), 130 interrupted."
)


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (the full usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, low=None, high=None, low_open=False):
    """An argparse type: `kind` within [low, high] (low excluded with `low_open`); a bad value is a
    usage error naming it, never a traceback or a value the library would misuse."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or (low is not None and (value <= low if low_open else value < low)):
            raise argparse.ArgumentTypeError(f"{text} should be {'above' if low_open else 'at least'} {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} should be at most {high}")
        return value

    parse.__name__ = kind.__name__
    return parse


POSITIVE = _number(int, 1)
NON_NEGATIVE = _number(int, 0)


def _device_name(text: str) -> str:
    """auto, cpu, cuda or cuda:N; whether the device exists is checked where it is used."""
    kind, _, index = text.partition(":")
    if text == "auto" or (kind in ("cpu", "cuda") and (not index or (kind == "cuda" and index.isdigit()))):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N")


def _add_decoded_limit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-decoded-bytes",
        type=POSITIVE,
        help="refuse files whose tensors decode to more bytes (default: 4096 x the file size, within 256 MiB-16 GiB)",
    )


def _fraction_or_count(text: str) -> float | int:
    """0.1 (a fraction in (0, 1)) or 500 (a count of examples)."""
    if text.strip().isdigit():
        value = int(text)
    else:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a fraction or a count of examples") from None
        if not 0 < value < 1:
            raise argparse.ArgumentTypeError(f"{text} should be a fraction in (0, 1) or a whole count, e.g. 0.1 or 500")
        return value
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} should be at least 1 example")
    return value


def _add_output_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        help="for a model whose forward returns several outputs: the one the task scores, a dict key (logits, as "
        "Hugging Face models return) or a tuple index (0)",
    )


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        "--data-dir",
        dest="data",
        help="an .npz or .safetensors file of arrays x (and y, x_test, y_test; x.NAME, x_test.NAME for a model that "
        "takes several inputs), package.module:function returning "
        "such arrays as a dict (or a deepshrink.DataSplits), or a directory of MNIST-format IDX files (default: "
        "$DEEPSHRINK_DATA, then /usr/share/datasets/fashion-mnist); `run`, `prune`, `quantize` and `encode` also "
        "take `none`: prune and share without retraining, encode as it is, measuring nothing",
    )
    parser.add_argument(
        "--validation",
        type=_fraction_or_count,
        help="the validation split: a fraction (0.1) or a count of examples (default: 10%% of an array file, "
        "5000 IDX images)",
    )
    parser.add_argument(
        "--task",
        help=f"what the model does: {', '.join(BUILT_IN)} (default {DEFAULT_TASK}), or package.module:function "
        "returning a deepshrink.Task",
    )
    parser.add_argument("--device", default="auto", type=_device_name, help="auto, cpu, cuda or cuda:N (default: auto)")


def _load_data(args: argparse.Namespace, train_subset: int | None = None):
    from deepshrink.data import load_splits

    return load_splits(args.data, args.validation, seed=0, train_subset=train_subset)


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training (defaults: the model's reference settings)")
    group.add_argument("--epochs", type=NON_NEGATIVE, help="number of passes over the training split")
    group.add_argument(
        "--lr", dest="learning_rate", type=_number(float, 0, low_open=True), help="initial learning rate of SGD"
    )
    group.add_argument("--momentum", type=_number(float, 0, 1), help="SGD momentum")
    group.add_argument("--weight-decay", type=_number(float, 0), help="L2 weight decay")
    group.add_argument("--batch-size", type=POSITIVE, help="examples per step")
    group.add_argument("--schedule", choices=("cosine", "step", "constant"), help="learning-rate schedule")
    group.add_argument("--seed", type=NON_NEGATIVE, help="seed of weight initialisation and shuffling")
    group.add_argument("--train-subset", type=POSITIVE, help="train on the first N examples only (quick runs)")


def _training_config(args: argparse.Namespace):
    from deepshrink.models import get_model_spec, is_factory_path
    from deepshrink.train import TrainConfig

    base = TrainConfig() if is_factory_path(args.model) else get_model_spec(args.model).reference_training
    overrides = {
        name: getattr(args, name)
        for name in ("epochs", "learning_rate", "momentum", "weight_decay", "batch_size", "schedule", "seed")
        if getattr(args, name) is not None
    }
    return TrainConfig.from_dict({**base.to_dict(), **overrides})


def _write_report(directory: str, stem: str, markdown: str, data: dict, protect: tuple) -> None:
    """STEM.md and STEM.json in `directory`, each written atomically."""
    import json

    from deepshrink.files import atomic_output

    for suffix, text in ((".md", markdown + "\n"), (".json", json.dumps(data, indent=2, default=float))):
        with atomic_output(Path(directory) / f"{stem}{suffix}", protect=protect) as temporary:
            temporary.write_text(text)


def _command_train(args: argparse.Namespace) -> int:
    """`deepshrink train`: train a registered model or factory and save its checkpoint."""
    from deepshrink.references import train_and_save

    config = _training_config(args)
    data = _load_data(args, args.train_subset)
    out = Path(args.out or f"runs/{args.model.replace(':', '-')}.safetensors")
    trained = train_and_save(args.model, data, config, out, task=args.task, device=args.device, progress=not args.quiet)
    print(
        f"model: {args.model}  trained {config.epochs} epochs on {len(data.train)} examples in {trained.seconds:.1f}s"
    )
    print(f"validation {trained.metric_name}: {trained.validation_metric:.4f}")
    print(f"test {trained.metric_name}: {trained.test_metric:.4f}")
    print(f"checkpoint: {out}")
    return 0


def _command_evaluate(args: argparse.Namespace) -> int:
    """`deepshrink evaluate`: a checkpoint's metric on one split."""
    from deepshrink.file_commands import evaluate_checkpoint

    result, name = evaluate_checkpoint(
        args.checkpoint,
        args.model,
        args.data,
        validation=args.validation,
        split=args.split,
        task=args.task,
        output=args.output,
        device=args.device,
    )
    print(f"model: {name}  split: {args.split} ({result.count} examples)")
    print(f"{args.split} {result.metric_name}: {result.metric:.4f}")
    print(f"{args.split} loss: {result.loss:.4f}")
    return 0


def _parse_assignments(values: list[str] | None, option: str) -> dict[str, float]:
    """Turn ["fc1=0.9", "conv*=0.5"] into {"fc1": 0.9, "conv*": 0.5}."""
    parsed = {}
    for value in values or []:
        pattern, separator, number = value.partition("=")
        try:
            parsed[pattern] = float(number)
        except ValueError:
            separator = ""
        if not separator or not pattern:
            raise ConfigError(f"{option} {value!r} should look like LAYER_PATTERN=NUMBER, e.g. {option} 'fc*=0.9'")
    return parsed


def _stage_options(parser: argparse.ArgumentParser, settings_class) -> None:
    """One option per field of a stage's settings dataclass, its choices, range and help read from
    the field's metadata; defaults stay in the dataclass (an option left out is not passed)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(settings_class)
    group = parser.add_argument_group(f"{settings_class.__name__} (defaults as shown)")
    for item in dataclasses.fields(settings_class):
        flag = "--" + item.name.replace("_", "-")
        flags = [flag, "--lr"] if item.name == "learning_rate" else [flag]
        metadata = item.metadata
        hint = hints[item.name]
        inner = [argument for argument in typing.get_args(hint) if argument is not type(None)]
        kind = inner[0] if inner else hint
        default = item.default if item.default is not dataclasses.MISSING else None
        shown = "" if default is None else f" (default {default})"
        if item.name == "distill":
            group.add_argument(flag, action="store_true", help="retrain against the input model's soft targets")
        elif typing.get_origin(kind) is dict:
            value_type = typing.get_args(kind)[1].__name__
            group.add_argument(
                flag,
                action="append",
                metavar=f"LAYER={value_type.upper()}",
                help=f"{metadata.get('help', '')}; LAYER is a glob; repeatable",
            )
        elif typing.get_origin(kind) is list:
            group.add_argument(flag, nargs="+", metavar="PATTERN", help=metadata.get("help", ""))
        else:
            group.add_argument(
                *flags,
                dest=item.name,
                type=kind,
                choices=metadata.get("choices"),
                help=f"{metadata.get('help', '')}{shown}",
            )


def _stage_settings(args: argparse.Namespace, settings_class):
    """The settings dataclass from the options given; the dataclass checks every value."""
    import dataclasses
    import typing

    from deepshrink.settings import DistillSettings

    hints = typing.get_type_hints(settings_class)
    values = {}
    for item in dataclasses.fields(settings_class):
        given = getattr(args, item.name, None)
        if given is None or given is False:
            continue
        if item.name == "distill":
            values[item.name] = DistillSettings()
            continue
        kind = [argument for argument in typing.get_args(hints[item.name]) if argument is not type(None)]
        kind = kind[0] if kind else hints[item.name]
        if typing.get_origin(kind) is dict:
            option = "--" + item.name.replace("_", "-")
            parsed = _parse_assignments(given, option)
            if typing.get_args(kind)[1] is int:
                if any(float(value) != int(value) for value in parsed.values()):
                    raise ConfigError(f"{option} takes whole numbers, got {given}")
                parsed = {pattern: int(value) for pattern, value in parsed.items()}
            given = parsed
        values[item.name] = given
    return settings_class(**values)


def _command_stage(args: argparse.Namespace) -> int:
    """Any registered stage on a checkpoint: parse, call the library once, print."""
    from deepshrink.pipeline import run_stage_on_checkpoint
    from deepshrink.stages import stage_named

    stage = stage_named(args.stage)
    settings = _stage_settings(args, stage.settings)
    no_data = args.data is not None and str(args.data).lower() == "none"
    data = None if no_data else _load_data(args, getattr(args, "train_subset", None))
    done = run_stage_on_checkpoint(
        args.checkpoint,
        settings,
        data,
        args.out,
        model=args.model,
        task=args.task,
        output=args.output,
        batchnorm=getattr(args, "batchnorm", "fold"),
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
        evaluate_output=not getattr(args, "no_evaluate", False),
        teacher=_teacher_settings(args),
    )
    summary = stage.summarize(done.model, done.result) if stage.summarize else ""
    print(summary)
    name = done.metric_name
    if done.reference_metric is None:
        print("nothing was measured: no data (--data none)")
    elif done.metric is None:
        print(f"test {name} of the input: {done.reference_metric:.4f}")
    elif stage.changes_model:
        print(
            f"test {name}: {done.reference_metric:.4f} before, {done.metric:.4f} after "
            f"({done.metric - done.reference_metric:+.4f})"
        )
    else:
        print(f"test {name} of the decoded file: {done.metric:.4f}")
    print(f"{'checkpoint' if stage.changes_model else 'file'}: {done.path}")
    if args.report_dir:
        _write_stage_report(args, stage, done, summary)
    return 0


def _write_stage_report(args: argparse.Namespace, stage, done, summary: str) -> None:
    """STAGE.md and STAGE.json, and the stage's figure, in --report-dir."""
    data = {
        **done.result.to_dict(),
        "metric": done.metric_name,
        "reference_test_metric": done.reference_metric,
        "test_metric": done.metric,
    }
    _write_report(args.report_dir, stage.name, f"```\n{summary}\n```", data, (args.checkpoint,))
    from deepshrink.report import stage_figure

    figure = stage_figure(done.model, done.result, Path(args.report_dir))
    print(f"report: {args.report_dir}/{stage.name}.md, {stage.name}.json" + (f", {figure.name}" if figure else ""))


def _command_decode(args: argparse.Namespace) -> int:
    """`deepshrink decode`: a .dcz file's tensors, decoded, as a .safetensors checkpoint."""
    from deepshrink.checkpoint import save_state_dict
    from deepshrink.compressed import read_state_dict

    state, metadata = read_state_dict(args.file, args.max_decoded_bytes)
    save_state_dict(
        args.out,
        state,
        model_name=metadata.get("model"),
        metadata={"decompressed_from": Path(args.file).name},
        protect=(args.file,),
    )
    print(f"decoded {len(state)} tensors into {args.out}")
    return 0


def _command_inspect(args: argparse.Namespace) -> int:
    """`deepshrink inspect`: a .dcz file's per-layer size table, read from its header."""
    from deepshrink.compressed import inspect_header
    from deepshrink.encode.sizes import format_size_table, size_report

    header, checked = inspect_header(args.file, args.max_decoded_bytes, header_only=args.header_only)
    rows, totals = size_report(header, file_bytes=Path(args.file).stat().st_size)
    metadata = checked.metadata
    print(f"{args.file}: model {metadata.get('model')!r}, {metadata.get('library')}")
    print(format_size_table(rows, totals, markdown=args.markdown))
    return 0


def _command_run(args: argparse.Namespace) -> int:
    """`deepshrink run`: a recipe's whole pipeline (under torchrun, on every process)."""
    from deepshrink import distributed
    from deepshrink.pipeline import run_recipe
    from deepshrink.report import summary

    # Under torchrun every process runs the recipe on its shard of the data; rank 0 reports.
    with distributed.process_group_from_environment(args.device):
        result = run_recipe(
            args.recipe,
            model_name=args.model,
            checkpoint=args.checkpoint,
            data=args.data,
            validation=args.validation,
            task=args.task,
            output=args.output,
            run_dir=args.run_dir,
            device=args.device,
            progress=not args.quiet,
        )
        if distributed.is_main_process():
            print(summary(result))
    return 0


def _runtime_modes(values: list[str] | None) -> str | dict[str, str]:
    """["sparse"] or ["fc*=dense", "conv*=sparse"] into what load_runtime takes."""
    if not values:
        return "auto"
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    modes = {}
    for value in values:
        pattern, separator, mode = value.partition("=")
        if not separator:
            raise ConfigError(f"--mode {value!r}: give one mode, or LAYER_GLOB=MODE entries")
        modes[pattern] = mode
    return modes


def _command_predict(args: argparse.Namespace) -> int:
    """`deepshrink predict`: a .dcz file's model run from its compressed form over one split.

    Raises:
        ConfigError: a device other than the CPU.
    """
    from deepshrink.file_commands import predict_file

    if args.device not in ("auto", "cpu"):
        raise ConfigError(f"--device {args.device}: predict runs the compressed form on the CPU; use --device cpu")
    done = predict_file(
        args.file,
        args.model,
        args.data,
        validation=args.validation,
        split=args.split,
        batch_size=args.batch_size,
        mode=_runtime_modes(args.mode),
        task=args.task,
        output=args.output,
        max_decoded_bytes=args.max_decoded_bytes,
    )
    if done.evaluation is None:
        print(f"{args.file}: the data has no targets, so no metric; ran {done.count} {args.split} examples")
    else:
        result = done.evaluation
        print(f"{args.file}: {args.split} {result.metric_name} {result.metric:.4f} on {result.count} examples")
    print(f"throughput: {done.throughput:,.0f} examples/s at batch {args.batch_size} ({done.seconds:.2f} s)")
    return 0


def _command_bench(args: argparse.Namespace) -> int:
    """`deepshrink bench`: the compressed form's speed against dense, per layer and batch size."""
    from deepshrink.file_commands import bench_file
    from deepshrink.runtime import bench

    done = bench_file(
        args.file,
        args.model,
        mode=_runtime_modes(args.mode),
        batches=tuple(args.batch),
        repeats=args.repeats,
        input_shape=tuple(args.input_shape) if args.input_shape else None,
        layers=args.layers,
        max_decoded_bytes=args.max_decoded_bytes,
        data=args.data,
    )
    print(f"{args.file}: {done.model_name}, on {done.inputs}, median of {args.repeats} runs per batch size")
    print(bench.format_latency(done.rows))
    print(done.residency)
    if done.layer_rows is not None:
        print(f"each layer alone, every weight layer compressed, batch {args.batch[0]}:")
        print(bench.format_layer_latency(done.layer_rows))
    return 0


def _command_sensitivity(args: argparse.Namespace) -> int:
    """`deepshrink sensitivity`: each layer pruned alone, the plot and table."""
    from deepshrink.file_commands import sensitivity_of_checkpoint
    from deepshrink.prune.sensitivity import format_sensitivity

    done = sensitivity_of_checkpoint(
        args.checkpoint,
        args.model,
        args.data,
        out_dir=args.out_dir,
        validation=args.validation,
        layers=args.layers,
        task=args.task,
        output=args.output,
        device=args.device,
        progress=not args.quiet,
    )
    result = done.result
    if done.targets_from_the_model:
        print(f"the data has no targets: {result.metric_name} is measured against the original model's own outputs")
    print(format_sensitivity(result))
    suggestion = result.suggest(args.max_drop)
    print(f"largest sparsity per layer within a {args.max_drop:g} drop of {result.metric_name} (each layer alone):")
    print("  " + " ".join(f"--sparsity {name}={value}" for name, value in suggestion.items()))
    print(f"plot: {done.plot}")
    return 0


def _command_reference(args: argparse.Namespace) -> int:
    """`deepshrink reference`: train (or find cached) a registered model's reference."""
    from deepshrink.references import reference_model

    data = _load_data(args)
    reference = reference_model(args.model, data, cache_dir=args.cache_dir, device=args.device, progress=not args.quiet)
    origin = "loaded from cache" if reference.from_cache else f"trained in {reference.seconds:.1f}s"
    parameters = sum(parameter.numel() for parameter in reference.model.parameters())
    print(f"reference {args.model} ({parameters:,} parameters), {origin}")
    print(f"test {reference.metric_name}: {reference.test_metric:.4f}")
    print(f"checkpoint: {reference.path}")
    return 0


def _command_info(args: argparse.Namespace) -> int:
    """`deepshrink info`: versions, the data set found, the models and the cache."""
    import torch

    from deepshrink.data import find_data_files
    from deepshrink.errors import DataError
    from deepshrink.models import build_model, list_models
    from deepshrink.references import cache_directory

    print(f"deepshrink {__version__}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    try:
        files = find_data_files(args.data)
        print(f"data: {files['train_images'].parent}")
    except DataError as error:
        print(f"data: not found ({error})")
    print(f"cache: {cache_directory()}")
    print("models:")
    for spec in list_models():
        parameters = sum(parameter.numel() for parameter in build_model(spec.name).parameters())
        print(f"  {spec.name:<16} {parameters:>9,} parameters  {spec.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: global flags, one subcommand per command and registered stage.

    Returns:
        The argparse parser; each subcommand sets `handler`.
    """
    parser = _Parser(
        prog="deepshrink",
        description="Deep Compression for PyTorch: prune, share weights, encode, and run compressed models.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"deepshrink {__version__}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="on an error, print the traceback too")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_training_commands(commands)
    _add_stage_commands(commands)
    _add_file_commands(commands)
    _add_pipeline_commands(commands)
    _add_runtime_commands(commands)
    _add_other_commands(commands)
    return parser


def _add_training_commands(commands) -> None:
    """The train and evaluate: checkpoints from data."""
    train = commands.add_parser("train", help="train a model and save a safetensors checkpoint", epilog=EPILOG)
    train.add_argument(
        "--model", default="lenet-300-100", help="registered name (see `deepshrink info`) or package.module:factory"
    )
    train.add_argument("--out", help="checkpoint path to write (default: runs/MODEL.safetensors)")
    _add_training_options(train)
    _add_data_options(train)
    train.set_defaults(handler=_command_train)

    evaluate = commands.add_parser(
        "evaluate", help="the task's metric of a checkpoint on the test or validation split", epilog=EPILOG
    )
    evaluate.add_argument("checkpoint", help="a .safetensors checkpoint, or a .pt/.pth state_dict")
    evaluate.add_argument(
        "--model", help="model name or package.module:factory (default: the one the checkpoint names)"
    )
    evaluate.add_argument("--split", choices=("test", "validation"), default="test", help="which split (default: test)")
    _add_data_options(evaluate)
    _add_output_option(evaluate)
    evaluate.set_defaults(handler=_command_evaluate)


def _add_stage_commands(commands) -> None:
    """The one command per registered stage, its options from its settings dataclass."""
    from deepshrink.stages import registered_stages

    for stage in registered_stages():
        command = commands.add_parser(stage.name, help=stage.description, epilog=EPILOG)
        command.add_argument("checkpoint", help="the input checkpoint (.safetensors, or a .pt/.pth state_dict)")
        command.add_argument(
            "--model", help="model name or package.module:factory (default: the one the checkpoint names)"
        )
        what = "checkpoint" if stage.changes_model else f"{stage.output_suffix} file"
        command.add_argument("--out", required=True, help=f"{what} to write (never the input)")
        _stage_options(command, stage.settings)
        if "distill" in {item.name for item in dataclasses.fields(stage.settings)}:
            _add_teacher_options(command)
        command.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of sampling and shuffling (default 0)")
        if stage.changes_model:
            command.add_argument("--train-subset", type=POSITIVE, help="retrain on the first N training examples only")
            command.add_argument(
                "--batchnorm",
                choices=("fold", "freeze", "train", "recalibrate"),
                default="fold",
                help="BatchNorm while retraining: fold into the layer before (default), freeze, train, recalibrate",
            )
        else:
            command.add_argument("--no-evaluate", action="store_true", help="skip measuring the decoded file's metric")
        command.add_argument("--report-dir", help=f"also write {stage.name}.md, {stage.name}.json and a figure here")
        _add_data_options(command)
        _add_output_option(command)
        command.set_defaults(handler=_command_stage, stage=stage.name)


def _add_teacher_options(command: argparse.ArgumentParser) -> None:
    """A recipe's `teacher` section, for a stage that distills: the options with --distill."""
    group = command.add_argument_group("teacher (with --distill; default: the input checkpoint alone)")
    group.add_argument(
        "--teacher-references",
        type=POSITIVE,
        metavar="N",
        help="distil from the mean of the checkpoint and N-1 copies trained by a registered model's reference "
        "settings at seeds 1 to N-1 (cached)",
    )
    group.add_argument(
        "--teacher-checkpoints",
        nargs="+",
        metavar="CHECKPOINT",
        help="other trained copies of the model (.safetensors, or a .pt/.pth state_dict), averaged with the checkpoint",
    )


def _teacher_settings(args: argparse.Namespace):
    """The TeacherSettings the teacher options give, or None (the input checkpoint alone)."""
    from deepshrink.teachers import TeacherSettings

    references, checkpoints = getattr(args, "teacher_references", None), getattr(args, "teacher_checkpoints", None)
    if references is None and not checkpoints:
        return None
    return TeacherSettings(references=references or 1, checkpoints=list(checkpoints or []))


def _add_file_commands(commands) -> None:
    """The decode and inspect: .dcz files."""
    decompress = commands.add_parser("decode", help="decode a .dcz file into a safetensors checkpoint", epilog=EPILOG)
    decompress.add_argument("file", help="the .dcz file")
    decompress.add_argument("--out", required=True, help="safetensors file to write")
    _add_decoded_limit(decompress)
    decompress.set_defaults(handler=_command_decode)

    inspect = commands.add_parser(
        "inspect", help="the per-layer size table of a .dcz file, read from its header", epilog=EPILOG
    )
    inspect.add_argument("file", help="the .dcz file")
    inspect.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    inspect.add_argument(
        "--header-only",
        action="store_true",
        help="read and check the header alone (fast on large files; the streams are not verified)",
    )
    _add_decoded_limit(inspect)
    inspect.set_defaults(handler=_command_inspect)


def _add_pipeline_commands(commands) -> None:
    """The run: a whole recipe."""
    run = commands.add_parser(
        "run",
        help="the whole pipeline from a YAML recipe: prune, quantize, encode, report (resumable)",
        epilog=EPILOG,
    )
    run.add_argument("recipe", help="a YAML recipe, e.g. recipes/lenet-300-100.yaml")
    run.add_argument("--run-dir", help="where stages, the .dcz file and the report go (default: runs/MODEL)")
    run.add_argument("--model", help="override the recipe's model: a registered name or package.module:factory")
    run.add_argument(
        "--checkpoint", help="start from these trained weights (default: the registered model's cached reference)"
    )
    _add_data_options(run)
    _add_output_option(run)
    run.set_defaults(handler=_command_run, several_processes=True)


def _add_runtime_commands(commands) -> None:
    """The predict and bench: models run from their compressed form."""
    mode_help = (
        "auto (sparse where a layer's density is low enough), sparse, dense, or LAYER_GLOB=MODE entries (default: auto)"
    )
    predict = commands.add_parser(
        "predict", help="the task's metric and throughput of a .dcz file run from its compressed form", epilog=EPILOG
    )
    predict.add_argument("file", help="the .dcz file")
    predict.add_argument("--model", help="model name or package.module:factory (default: the one the file names)")
    predict.add_argument("--mode", nargs="+", help=mode_help)
    predict.add_argument("--batch-size", type=POSITIVE, default=1, help="examples per call (default 1)")
    _add_decoded_limit(predict)
    predict.add_argument("--split", choices=("test", "validation"), default="test", help="which split (default test)")
    _add_data_options(predict)
    _add_output_option(predict)
    predict.set_defaults(handler=_command_predict)

    bench = commands.add_parser(
        "bench", help="latency at batch 1, 8 and 64: dense against compressed, in the same run", epilog=EPILOG
    )
    bench.add_argument("file", help="the .dcz file")
    bench.add_argument("--model", help="model name or package.module:factory (default: the one the file names)")
    bench.add_argument("--mode", nargs="+", help=mode_help)
    bench.add_argument("--batch", type=POSITIVE, nargs="+", default=[1, 8, 64], help="batch sizes (default 1 8 64)")
    bench.add_argument("--repeats", type=POSITIVE, default=100, help="timed calls per batch size (default 100)")
    bench.add_argument(
        "--input-shape", type=POSITIVE, nargs="+", help="one example's shape (default: the one the file records)"
    )
    bench.add_argument(
        "--data",
        help="time on the first test examples of this data (as --data elsewhere) instead of made-up inputs: what a "
        "model that takes several inputs (token ids and an attention mask) needs",
    )
    _add_decoded_limit(bench)
    bench.add_argument(
        "--layers",
        action="store_true",
        help="also time each weight layer alone, dense against compressed, at the first --batch size",
    )
    bench.set_defaults(handler=_command_bench)


def _add_other_commands(commands) -> None:
    """The sensitivity, reference and info."""
    sensitivity = commands.add_parser(
        "sensitivity",
        help="the validation metric against sparsity for each layer alone (table and plot)",
        epilog=EPILOG,
    )
    sensitivity.add_argument("checkpoint", help="the trained model's checkpoint")
    sensitivity.add_argument("--model", help="model name or package.module:factory")
    sensitivity.add_argument("--layers", nargs="+", metavar="PATTERN", help="layers to analyse (default: all)")
    sensitivity.add_argument(
        "--max-drop",
        type=_number(float, 0),
        default=0.005,
        help="drop of the metric allowed per layer for the suggestion (default 0.005 = 0.5 points of accuracy)",
    )
    sensitivity.add_argument("--out-dir", default="runs/sensitivity", help="where the PNG and JSON go")
    _add_data_options(sensitivity)
    _add_output_option(sensitivity)
    sensitivity.set_defaults(handler=_command_sensitivity)

    reference = commands.add_parser(
        "reference", help="the cached reference model for a registered network (trained on first use)", epilog=EPILOG
    )
    reference.add_argument("model", nargs="?", default="lenet-300-100", help="registered model name")
    reference.add_argument("--cache-dir", help="cache directory (default: $DEEPSHRINK_CACHE or ~/.cache/deepshrink)")
    _add_data_options(reference)
    reference.set_defaults(handler=_command_reference)

    info = commands.add_parser("info", help="versions, data location, cache and registered models", epilog=EPILOG)
    info.add_argument("--data", "--data-dir", dest="data", help="data directory to check")
    info.set_defaults(handler=_command_info)


_PARAMETER_FLAGS = {
    "pass model=": "pass --model ",
    "pass model_name=": "pass --model ",
    "checkpoint=FILE": "--checkpoint FILE",
    "input shape ": "--input-shape ",
    "pass the nn.Module it was made from (model=...), a registered name": "pass --model with a registered name",
}


def _as_flags(message: str) -> str:
    for parameter, flag in _PARAMETER_FLAGS.items():
        message = message.replace(parameter, flag)
    return message


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _check_launcher(args: argparse.Namespace) -> None:
    """Under torchrun with several processes only `run` (which retrains on all of them) may run:
    any other command would do the same work N times and race to write the same file."""
    from deepshrink.distributed import launched_with_several_processes

    if launched_with_several_processes() and not getattr(args, "several_processes", False):
        raise ConfigError(
            f"`{args.command}` runs on one process; only `deepshrink run RECIPE` retrains under torchrun "
            "--nproc-per-node N (run this command without torchrun)"
        )


@functools.cache
def _parser() -> argparse.ArgumentParser:
    """`build_parser`'s parser, built once per process: building it takes about 25 ms (argparse
    passes every help string through gettext), which a process running many commands (the
    tests, a notebook calling `main`) would pay each time. Parsing leaves the parser unchanged."""
    return build_parser()


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every error is one line on stderr and a distinct exit code (EPILOG);
    the traceback is printed only with --debug.

    Args:
        argv: the arguments (default sys.argv[1:]).

    Returns:
        The exit code.
    """
    args = _parser().parse_args(argv)
    try:
        _check_launcher(args)
        return args.handler(args)
    except KeyboardInterrupt:
        print("deepshrink: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            import traceback

            traceback.print_exc()
        if isinstance(error, DeepshrinkError):
            message, code = _as_flags(str(error)), error.exit_code
        elif isinstance(error, OSError):
            name = f" {str(error.filename)!r}" if error.filename else ""
            message, code = f"cannot use{name}: {error.strerror or error}", OutputError.exit_code
        elif isinstance(error, MemoryError):
            message, code = "out of memory; try a smaller batch or model", InternalError.exit_code
        else:
            message = (
                f"internal error ({type(error).__name__}: {error}); this is a bug in deepshrink: "
                "rerun with --debug and report the traceback"
            )
            code = InternalError.exit_code
        print(f"deepshrink: error: {_one_line(message)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
