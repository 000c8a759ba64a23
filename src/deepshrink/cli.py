"""The `deepshrink` command line. It parses arguments and calls the library; nothing more.

Errors from the library's exception hierarchy become one-line messages with a distinct exit
code per kind (see deepshrink.errors); argparse's own usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deepshrink import __version__
from deepshrink.errors import ConfigError, DeepshrinkError

EPILOG = (
    "Exit codes: 0 ok, 2 usage, 3 bad option or config, 4 data not found or unreadable, "
    "5 malformed file, 6 checkpoint problem, 7 model problem, 8 unsupported layer, 130 interrupted."
)


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        help="directory of MNIST-format IDX files (default: $DEEPSHRINK_DATA, then /usr/share/datasets/fashion-mnist)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training (defaults: the model's reference settings)")
    group.add_argument("--epochs", type=int, help="number of passes over the training split")
    group.add_argument("--lr", dest="learning_rate", type=float, help="initial learning rate of SGD")
    group.add_argument("--momentum", type=float, help="SGD momentum")
    group.add_argument("--weight-decay", type=float, help="L2 weight decay")
    group.add_argument("--batch-size", type=int, help="examples per step")
    group.add_argument("--schedule", choices=("cosine", "step", "constant"), help="learning-rate schedule")
    group.add_argument("--seed", type=int, help="seed of weight initialisation and shuffling")
    group.add_argument("--train-subset", type=int, help="train on the first N examples only (quick runs)")


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


def command_train(args: argparse.Namespace) -> int:
    from deepshrink.checkpoint import save_checkpoint
    from deepshrink.data import load_data, make_loader
    from deepshrink.references import train_model
    from deepshrink.train import evaluate

    config = _training_config(args)
    data = load_data(args.data_dir, seed=0, train_subset=args.train_subset)
    model, seconds = train_model(args.model, data, config, device=args.device, progress=not args.quiet)
    test = evaluate(model, make_loader(data.test, 1000, shuffle=False), args.device)
    validation = evaluate(model, make_loader(data.validation, 1000, shuffle=False), args.device)
    out = Path(args.out or f"runs/{args.model.replace(':', '-')}.safetensors")
    save_checkpoint(
        out,
        model.cpu(),
        model_name=args.model,
        metadata={
            "training": config.to_dict(),
            "data_fingerprint": data.fingerprint,
            "data_source": str(data.source),
            "train_examples": len(data.train),
            "validation_accuracy": validation.accuracy,
            "test_accuracy": test.accuracy,
            "train_seconds": seconds,
        },
    )
    print(f"model: {args.model}  trained {config.epochs} epochs on {len(data.train)} examples in {seconds:.1f}s")
    print(f"validation accuracy: {validation.accuracy:.4f}")
    print(f"test accuracy: {test.accuracy:.4f}")
    print(f"checkpoint: {out}")
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    from deepshrink.checkpoint import load_model
    from deepshrink.data import load_data, make_loader
    from deepshrink.train import evaluate

    model, checkpoint = load_model(args.checkpoint, args.model)
    data = load_data(args.data_dir)
    split = {"test": data.test, "validation": data.validation}[args.split]
    result = evaluate(model, make_loader(split, 1000, shuffle=False), args.device)
    print(f"model: {args.model or checkpoint.model_name}  split: {args.split} ({result.count} examples)")
    print(f"{args.split} accuracy: {result.accuracy:.4f}")
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


def command_prune(args: argparse.Namespace) -> int:
    from deepshrink import stages
    from deepshrink.checkpoint import load_model, save_checkpoint
    from deepshrink.data import load_data
    from deepshrink.prune.statistics import as_dicts, format_table, layer_statistics, totals
    from deepshrink.recipe import PruneSettings
    from deepshrink.train import evaluate

    settings = PruneSettings(
        method=args.method,
        sparsity=_parse_assignments(args.sparsity, "--sparsity") or None,
        quality=_parse_assignments(args.quality, "--quality") or None,
        global_sparsity=args.global_sparsity,
        layers=args.layers,
        rounds=args.rounds,
        retrain_epochs=args.retrain_epochs,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        finetune_epochs=args.finetune_epochs,
    )
    model, checkpoint = load_model(args.checkpoint, args.model)
    data = load_data(args.data_dir, train_subset=args.train_subset)
    loaders = stages.Loaders.from_splits(data)
    test_loader = loaders.test
    reference_test = evaluate(model, test_loader, args.device).accuracy
    log = stages.prune(model, settings, loaders, seed=args.seed, device=args.device, progress=not args.quiet)
    pruned_test = evaluate(model, test_loader, args.device).accuracy
    rows = layer_statistics(model.cpu(), data.test.tensors[0][:2])
    summary = totals(rows)
    out = Path(args.out)
    save_checkpoint(
        out,
        model,
        model_name=args.model or checkpoint.model_name,
        metadata={
            **checkpoint.metadata,
            "stage": "pruned",
            "pruning": log,
            "reference_test_accuracy": reference_test,
            "test_accuracy": pruned_test,
            "kept_fraction": summary["kept_fraction"],
        },
        protect=(args.checkpoint,),
    )
    print(format_table(rows))
    print(f"compression by pruning: {summary['compression']:.1f}x ({100 * summary['kept_fraction']:.2f}% kept)")
    print(
        f"test accuracy: {reference_test:.4f} before, {pruned_test:.4f} after "
        f"({100 * (pruned_test - reference_test):+.2f} points)"
    )
    print(f"checkpoint: {out}")
    if args.report_dir:
        report_dir = Path(args.report_dir)
        data = {
            "layers": as_dicts(rows),
            "totals": summary,
            "log": log,
            "reference_test_accuracy": reference_test,
            "test_accuracy": pruned_test,
        }
        _write_report(args.report_dir, "pruning", format_table(rows, markdown=True), data, (args.checkpoint,))
        print(f"report: {report_dir}/pruning.md, pruning.json")
    return 0


def command_quantize(args: argparse.Namespace) -> int:
    from deepshrink import stages
    from deepshrink.checkpoint import load_model, save_checkpoint
    from deepshrink.data import load_data
    from deepshrink.quantize.report import format_sharing_table, sharing_rows
    from deepshrink.recipe import QuantizeSettings
    from deepshrink.train import evaluate

    parsed = _parse_assignments(args.bits, "--bits")
    if any(float(value) != int(value) for value in parsed.values()):
        raise ConfigError(f"--bits takes whole numbers of bits, got {args.bits}")
    settings = QuantizeSettings(
        bits={pattern: int(value) for pattern, value in parsed.items()} or None,
        init=args.init,
        finetune_epochs=args.finetune_epochs,
        optimizer=args.optimizer,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
    )
    model, checkpoint = load_model(args.checkpoint, args.model)
    loaders = stages.Loaders.from_splits(load_data(args.data_dir, train_subset=args.train_subset))
    test_loader = loaders.test
    before = evaluate(model, test_loader, args.device).accuracy
    records, stage_log = stages.quantize(
        model, settings, loaders, seed=args.seed, device=args.device, progress=not args.quiet
    )
    tuned = evaluate(model, test_loader, args.device).accuracy
    rows = sharing_rows(model.cpu(), records)
    out = Path(args.out)
    log = {
        "init": args.init,
        "bits": {name: record.bits for name, record in records.items()},
        "finetune_epochs": args.finetune_epochs,
        "optimizer": args.optimizer,
        "learning_rate": args.lr,
        "test_accuracy_before": before,
        "validation_accuracy_after_sharing": stage_log["validation_accuracy_after_sharing"],
        "test_accuracy": tuned,
    }
    save_checkpoint(
        out,
        model,
        model_name=args.model or checkpoint.model_name,
        metadata={**checkpoint.metadata, "stage": "quantized", "quantization": log, "test_accuracy": tuned},
        protect=(args.checkpoint,),
    )
    print(format_sharing_table(rows))
    print(f"test accuracy: {before:.4f} before, {tuned:.4f} after fine-tuning ({100 * (tuned - before):+.2f} points)")
    print(f"checkpoint: {out}")
    if args.report_dir:
        from deepshrink.quantize.report import plot_codebooks

        report_dir = Path(args.report_dir)
        data = {"layers": rows, **log, "epochs": stage_log.get("epochs", [])}
        _write_report(
            args.report_dir, "quantization", format_sharing_table(rows, markdown=True), data, (args.checkpoint,)
        )
        plot_codebooks(model, records, report_dir / "codebooks.png")
        print(f"report: {report_dir}/quantization.md, quantization.json, codebooks.png")
    return 0


def command_compress(args: argparse.Namespace) -> int:
    from deepshrink.checkpoint import load_model
    from deepshrink.compressed import format_size_table, load_compressed, save_compressed, size_report
    from deepshrink.data import load_data, make_loader
    from deepshrink.encode.container import read_header
    from deepshrink.train import evaluate

    index_bits = {pattern: int(value) for pattern, value in _parse_assignments(args.index_bits, "--index-bits").items()}
    model, checkpoint = load_model(args.checkpoint, args.model)
    name = args.model or checkpoint.model_name
    out = save_compressed(
        model,
        args.out,
        model_name=name,
        index_bits=index_bits or None,
        layout=args.layout,
        coder=args.coder,
        metadata={"source": Path(args.checkpoint).name, **checkpoint.metadata},
        protect=(args.checkpoint,),
    )
    rows, totals = size_report(read_header(out))
    print(format_size_table(rows, totals))
    print(
        f"file: {out} ({totals['file_bytes']:,} bytes, {totals['compression']:.1f}x smaller than "
        f"{totals['fp32_parameter_bytes']:,} fp32 parameter bytes)"
    )
    if not args.no_evaluate:
        # The accuracy that counts is the one of the model decoded from the written file.
        decoded, _ = load_compressed(out, args.model)
        accuracy = evaluate(decoded, make_loader(load_data(args.data_dir).test, 1000, shuffle=False), args.device)
        print(f"test accuracy of the decoded file: {accuracy.accuracy:.4f}")
    if args.report_dir:
        from dataclasses import asdict

        data = {
            "layers": [asdict(row) | {"rate": row.rate, "rate_fixed": row.rate_fixed} for row in rows],
            "totals": totals,
        }
        _write_report(
            args.report_dir, "compression", format_size_table(rows, totals, markdown=True), data, (args.checkpoint,)
        )
        from deepshrink.compressed import plot_distributions

        plot_distributions(out, Path(args.report_dir) / "distributions.png")
    return 0


def command_decompress(args: argparse.Namespace) -> int:
    from deepshrink.checkpoint import save_state_dict
    from deepshrink.compressed import read_state_dict

    state, metadata = read_state_dict(args.file)
    save_state_dict(
        args.out,
        state,
        model_name=metadata.get("model"),
        metadata={"decompressed_from": Path(args.file).name},
        protect=(args.file,),
    )
    print(f"decoded {len(state)} tensors into {args.out}")
    return 0


def command_inspect(args: argparse.Namespace) -> int:
    from deepshrink.compressed import format_size_table, size_report
    from deepshrink.encode.container import read_header

    header = read_header(args.file)
    rows, totals = size_report(header)
    metadata = header.get("metadata", {})
    print(f"{args.file}: model {metadata.get('model')!r}, {metadata.get('library')}")
    print(format_size_table(rows, totals, markdown=args.markdown))
    return 0


def command_run(args: argparse.Namespace) -> int:
    from deepshrink.data import load_data
    from deepshrink.pipeline import compress
    from deepshrink.recipe import load_recipe
    from deepshrink.report import summary

    recipe = load_recipe(args.recipe)
    name = args.model or recipe.model
    if name is None:
        raise ConfigError(f"{args.recipe}: the recipe names no model; add `model: NAME` or pass --model")
    data = load_data(args.data_dir, seed=0, train_subset=recipe.data.train_subset)
    if args.checkpoint:
        from deepshrink.checkpoint import load_model

        model, _ = load_model(args.checkpoint, name)
    else:
        from deepshrink.models import is_factory_path
        from deepshrink.references import reference_model

        if is_factory_path(name):
            raise ConfigError(f"--model {name} is your own network: pass its trained weights with --checkpoint FILE")
        model = reference_model(name, data, device=args.device, progress=not args.quiet).model
    result = compress(
        model, recipe, data, run_dir=args.run_dir, model_name=name, device=args.device, progress=not args.quiet
    )
    print(summary(result))
    return 0


def command_lowrank(args: argparse.Namespace) -> int:
    from deepshrink import stages
    from deepshrink.checkpoint import STRUCTURE_KEY, load_model, save_checkpoint
    from deepshrink.data import load_data
    from deepshrink.lowrank import layer_spectra, parameter_count
    from deepshrink.recipe import DistillSettings, LowrankSettings
    from deepshrink.tables import render_table
    from deepshrink.train import evaluate

    settings = LowrankSettings(
        budget=args.budget,
        method=args.method,
        scheme=args.scheme,
        finetune_epochs=args.finetune_epochs,
        selection_epochs=args.selection_epochs,
        selection_seeds=args.selection_seeds,
        projection=args.projection,
        learning_rate=args.lr,
        distill=DistillSettings() if args.distill else None,
    )
    model, checkpoint = load_model(args.checkpoint, args.model)
    if checkpoint.metadata.get(STRUCTURE_KEY):
        raise ConfigError(f"{args.checkpoint} is already factored; start from the unfactored model")
    loaders = stages.Loaders.from_splits(load_data(args.data_dir, train_subset=args.train_subset))
    before = evaluate(model, loaders.test, args.device).accuracy
    parameters = parameter_count(model)
    spectra = layer_spectra(model, next(iter(loaders.validation))[0][:1], settings.scheme)
    log = stages.lowrank(model, settings, loaders, seed=args.seed, device=args.device, progress=not args.quiet)
    after = evaluate(model, loaders.test, args.device).accuracy
    rows = []
    for name, spectrum in spectra.items():
        rank = log["ranks"][name]
        rows.append(
            [
                name,
                f"{spectrum.full_rank}",
                "dense" if rank is None else str(rank),
                f"{spectrum.dense_macs:,}",
                f"{spectrum.macs(rank):,}",
            ]
        )
    print(render_table(["layer", "full rank", "rank", "MACs before", "MACs after"], rows))
    print(
        f"{settings.method.upper()} at a budget of {100 * settings.budget:g}% of the MACs: "
        f"{100 * log['mac_fraction']:.1f}% kept, parameters {parameters:,} -> {parameter_count(model):,}"
    )
    print(
        f"test accuracy: {before:.4f} before, "
        f"validation {log['validation_accuracy_after_factorizing']:.4f} right after factorizing, "
        f"test {after:.4f} after {settings.finetune_epochs} epochs of fine-tuning"
    )
    save_checkpoint(
        args.out,
        model.cpu(),
        model_name=args.model or checkpoint.model_name,
        metadata={**checkpoint.metadata, "stage": "lowrank", "lowrank": log, STRUCTURE_KEY: log["structure"]},
        protect=(args.checkpoint,),
    )
    print(f"checkpoint: {args.out}")
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


def command_predict(args: argparse.Namespace) -> int:
    import time

    import torch

    from deepshrink.data import load_data, make_loader
    from deepshrink.runtime.load import load_runtime

    model = load_runtime(args.file, args.model, mode=_runtime_modes(args.mode))
    data = load_data(args.data_dir)
    split = {"test": data.test, "validation": data.validation}[args.split]
    loader = make_loader(split, args.batch_size, shuffle=False)
    correct = 0
    started = time.perf_counter()
    with torch.no_grad():
        for images, labels in loader:
            correct += int((model(images).argmax(dim=1) == labels).sum())
    seconds = time.perf_counter() - started
    count = len(split)
    print(f"{args.file}: {args.split} accuracy {correct / count:.4f} on {count} images")
    print(f"throughput: {count / seconds:,.0f} images/s at batch {args.batch_size} ({seconds:.2f} s)")
    return 0


def command_bench(args: argparse.Namespace) -> int:
    from deepshrink.compressed import load_compressed
    from deepshrink.runtime.bench import latency_table, layer_latency_table
    from deepshrink.runtime.load import load_runtime, resident_weight_bytes
    from deepshrink.tables import render_table

    dense, metadata = load_compressed(args.file, args.model)
    dense.eval()
    compressed = load_runtime(args.file, args.model, mode=_runtime_modes(args.mode))
    shape = tuple(args.input_shape)
    rows = latency_table(dense, compressed, shape, args.batch, repeats=args.repeats)
    print(f"{args.file}: {metadata.get('model')}, input {shape}, median of {args.repeats} runs per batch size")
    print(
        render_table(
            ["batch", "dense (ms)", "compressed (ms)", "speedup"],
            [
                [str(row["batch"]), f"{row['dense_ms']:.3f}", f"{row['compressed_ms']:.3f}", f"{row['speedup']:.2f}x"]
                for row in rows
            ],
        )
    )
    dense_bytes, compressed_bytes = resident_weight_bytes(dense), resident_weight_bytes(compressed)
    layers = dict(compressed.named_modules())
    print(
        render_table(
            ["layer", "runs as", "dense weight bytes", "resident bytes", "form"],
            [
                [
                    name,
                    type(layers[name]).__name__,
                    f"{dense_bytes[name]:,}",
                    f"{compressed_bytes[name]:,}",
                    getattr(getattr(layers[name], "weight_form", None), "form", "dense"),
                ]
                for name in compressed_bytes
            ],
        )
    )
    if args.layers:
        every = load_runtime(args.file, args.model, mode="sparse")
        print(f"each layer alone, every weight layer compressed, batch {args.batch[0]}:")
        print(
            render_table(
                ["layer", "form", "dense (us)", "compressed (us)", "speedup"],
                [
                    [
                        row["layer"],
                        row["form"],
                        f"{row['dense_us']:.1f}",
                        f"{row['compressed_us']:.1f}",
                        f"{row['speedup']:.2f}x",
                    ]
                    for row in layer_latency_table(dense, every, shape, args.batch[0], args.repeats)
                ],
            )
        )
    return 0


def command_sensitivity(args: argparse.Namespace) -> int:
    from deepshrink.checkpoint import load_model
    from deepshrink.data import load_data, make_loader
    from deepshrink.prune.sensitivity import (
        format_sensitivity,
        plot_sensitivity,
        sensitivity_analysis,
        write_sensitivity_json,
    )

    model, checkpoint = load_model(args.checkpoint, args.model)
    data = load_data(args.data_dir)
    result = sensitivity_analysis(
        model,
        make_loader(data.validation, 1000, shuffle=False),
        args.layers,
        device=args.device,
        progress=not args.quiet,
    )
    print(format_sensitivity(result))
    suggestion = result.suggest(args.max_drop)
    print(f"largest sparsity per layer within a {100 * args.max_drop:.2f}-point drop (each layer alone):")
    print("  " + " ".join(f"--sparsity {name}={value}" for name, value in suggestion.items()))
    out_dir = Path(args.out_dir)
    plot = plot_sensitivity(
        result,
        out_dir / "sensitivity.png",
        title=f"{args.model or checkpoint.model_name}: accuracy against sparsity per layer",
    )
    write_sensitivity_json(result, out_dir / "sensitivity.json")
    print(f"plot: {plot}")
    return 0


def command_reference(args: argparse.Namespace) -> int:
    from deepshrink.data import load_data
    from deepshrink.references import reference_model

    data = load_data(args.data_dir)
    reference = reference_model(args.model, data, cache_dir=args.cache_dir, device=args.device, progress=not args.quiet)
    origin = "loaded from cache" if reference.from_cache else f"trained in {reference.seconds:.1f}s"
    parameters = sum(parameter.numel() for parameter in reference.model.parameters())
    print(f"reference {args.model} ({parameters:,} parameters), {origin}")
    print(f"test accuracy: {reference.test_accuracy:.4f}")
    print(f"checkpoint: {reference.path}")
    return 0


def command_info(args: argparse.Namespace) -> int:
    import torch

    from deepshrink.data import find_data_files
    from deepshrink.errors import DataError
    from deepshrink.models import build_model, list_models
    from deepshrink.references import cache_directory

    print(f"deepshrink {__version__}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    try:
        files = find_data_files(args.data_dir)
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
    parser = argparse.ArgumentParser(
        prog="deepshrink",
        description="Deep Compression for PyTorch: prune, share weights, encode, and run compressed models.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"deepshrink {__version__}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model and save a safetensors checkpoint", epilog=EPILOG)
    train.add_argument(
        "--model", default="lenet-300-100", help="registered name (see `deepshrink info`) or package.module:factory"
    )
    train.add_argument("--out", help="checkpoint path to write (default: runs/MODEL.safetensors)")
    _add_training_options(train)
    _add_data_options(train)
    train.set_defaults(handler=command_train)

    evaluate = commands.add_parser(
        "evaluate", help="accuracy of a checkpoint on the test or validation split", epilog=EPILOG
    )
    evaluate.add_argument("checkpoint", help="a .safetensors checkpoint, or a .pt/.pth state_dict")
    evaluate.add_argument(
        "--model", help="model name or package.module:factory (default: the one the checkpoint names)"
    )
    evaluate.add_argument("--split", choices=("test", "validation"), default="test", help="which split (default: test)")
    _add_data_options(evaluate)
    evaluate.set_defaults(handler=command_evaluate)

    prune = commands.add_parser(
        "prune", help="prune a checkpoint by magnitude (iteratively, with retraining) or by DNS", epilog=EPILOG
    )
    prune.add_argument("checkpoint", help="the trained model's checkpoint")
    prune.add_argument("--model", help="model name or package.module:factory (default: the one the checkpoint names)")
    prune.add_argument("--out", required=True, help="pruned checkpoint to write (never the input)")
    target = prune.add_argument_group("what to prune (exactly one kind)")
    target.add_argument(
        "--sparsity",
        action="append",
        metavar="LAYER=S",
        help="final fraction of LAYER's weights to prune; LAYER is a glob; repeatable",
    )
    target.add_argument(
        "--quality",
        action="append",
        metavar="LAYER=Q",
        help="Han's rule: prune |w| < Q x std(w) each round (with --method dns: the crate c "
        "of Guo et al., threshold mean+c*std of |w|); repeatable",
    )
    target.add_argument(
        "--global-sparsity",
        type=float,
        metavar="S",
        help="one magnitude threshold across --layers, pruning fraction S in total",
    )
    target.add_argument("--layers", nargs="+", metavar="PATTERN", help="layers for --global-sparsity (default: all)")
    prune.add_argument(
        "--method",
        choices=("magnitude", "dns"),
        default="magnitude",
        help="magnitude: prune then retrain with masks held, --rounds times; "
        "dns: Dynamic Network Surgery for --retrain-epochs epochs",
    )
    prune.add_argument("--rounds", type=int, default=6, help="prune-retrain rounds (default 6)")
    prune.add_argument("--retrain-epochs", type=int, default=8, help="retraining epochs per round (default 8)")
    prune.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        help="with --method dns: then retrain this many epochs with the masks fixed, at lr/2",
    )
    prune.add_argument("--lr", type=float, default=0.02, help="retraining learning rate (default 0.02)")
    prune.add_argument("--weight-decay", type=float, default=5e-4, help="retraining weight decay (default 5e-4)")
    prune.add_argument("--batch-size", type=int, default=128, help="retraining batch size (default 128)")
    prune.add_argument("--train-subset", type=int, help="retrain on the first N training examples only (quick runs)")
    prune.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
    prune.add_argument("--report-dir", help="also write pruning.md and pruning.json here")
    _add_data_options(prune)
    prune.set_defaults(handler=command_prune)

    quantize = commands.add_parser(
        "quantize",
        help="share weights through per-layer k-means codebooks, then fine-tune the centroids",
        epilog=EPILOG,
    )
    quantize.add_argument("checkpoint", help="a trained or pruned checkpoint")
    quantize.add_argument(
        "--model", help="model name or package.module:factory (default: the one the checkpoint names)"
    )
    quantize.add_argument("--out", required=True, help="weight-shared checkpoint to write (never the input)")
    quantize.add_argument(
        "--bits",
        action="append",
        metavar="LAYER=B",
        help="bits per weight for layers matching the glob LAYER, 1 to 16; repeatable "
        "(default: 8 for conv, 5 for fc, as in the paper)",
    )
    quantize.add_argument(
        "--init",
        choices=("linear", "density", "forgy", "optimal"),
        default="linear",
        help="centroid initialisation (default linear, best in the paper)",
    )
    quantize.add_argument("--finetune-epochs", type=int, default=3, help="centroid fine-tuning epochs (default 3)")
    quantize.add_argument(
        "--optimizer", choices=("adam", "sgd"), default="adam", help="fine-tuning optimizer (default adam)"
    )
    quantize.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (default 1e-4)")
    quantize.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="fine-tuning weight decay (default 0: decay would pull centroids to zero)",
    )
    quantize.add_argument("--batch-size", type=int, default=128, help="fine-tuning batch size (default 128)")
    quantize.add_argument("--train-subset", type=int, help="retrain on the first N training examples only (quick runs)")
    quantize.add_argument("--seed", type=int, default=0, help="seed of forgy sampling and shuffling")
    quantize.add_argument("--report-dir", help="also write quantization.md, quantization.json and codebooks.png")
    _add_data_options(quantize)
    quantize.set_defaults(handler=command_quantize)

    compress = commands.add_parser(
        "compress",
        help="encode a pruned, weight-shared checkpoint into a .dcz file and report its size",
        epilog=EPILOG,
    )
    compress.add_argument("checkpoint", help="a checkpoint from `deepshrink quantize` (or prune)")
    compress.add_argument(
        "--model", help="model name or package.module:factory (default: the one the checkpoint names)"
    )
    compress.add_argument("--out", required=True, help=".dcz file to write (never the input)")
    compress.add_argument(
        "--index-bits",
        action="append",
        metavar="LAYER=B",
        help="gap width for layers matching LAYER, 1 to 16 (default 8 conv, 5 fc); repeatable",
    )
    compress.add_argument(
        "--layout", choices=("csr", "csc", "dense"), default="csr", help="sparse layout of pruned layers (default csr)"
    )
    compress.add_argument(
        "--coder",
        choices=("huffman", "fixed"),
        default="huffman",
        help="huffman (P+Q+H, default) or fixed-width codes (P+Q)",
    )
    compress.add_argument("--no-evaluate", action="store_true", help="skip measuring the decoded file's accuracy")
    compress.add_argument("--report-dir", help="also write compression.md and compression.json here")
    _add_data_options(compress)
    compress.set_defaults(handler=command_compress)

    decompress = commands.add_parser(
        "decompress", help="decode a .dcz file into a safetensors checkpoint", epilog=EPILOG
    )
    decompress.add_argument("file", help="the .dcz file")
    decompress.add_argument("--out", required=True, help="safetensors file to write")
    decompress.set_defaults(handler=command_decompress)

    inspect = commands.add_parser(
        "inspect", help="the per-layer size table of a .dcz file, read from its header", epilog=EPILOG
    )
    inspect.add_argument("file", help="the .dcz file")
    inspect.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    inspect.set_defaults(handler=command_inspect)

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
    run.set_defaults(handler=command_run)

    lowrank = commands.add_parser(
        "lowrank",
        help="SVD low-rank factorization at per-layer ranks chosen under a MAC budget, then fine-tuning",
        epilog=EPILOG,
    )
    lowrank.add_argument("checkpoint", help="the trained model's checkpoint")
    lowrank.add_argument("--model", help="model name or package.module:factory (default: the one the checkpoint names)")
    lowrank.add_argument("--out", required=True, help="factored checkpoint to write (never the input)")
    lowrank.add_argument("--budget", type=float, default=0.5, help="fraction of the original MACs (default 0.5)")
    lowrank.add_argument(
        "--method",
        choices=("cptv", "pos", "relaxed"),
        default="pos",
        help="cptv: one energy fraction for all layers; pos: best product of kept energies; "
        "relaxed: masks optimised on the training loss, its roundings, POS and CPTV each fine-tuned "
        "for --selection-epochs with --selection-seeds shuffles and the highest mean validation accuracy kept "
        "(default pos)",
    )
    lowrank.add_argument(
        "--selection-epochs",
        type=int,
        help="relaxed: fine-tuning epochs per candidate before scoring it on validation; "
        "0 scores on the training loss instead (default: as many as --finetune-epochs)",
    )
    lowrank.add_argument(
        "--selection-seeds",
        type=int,
        default=1,
        help="relaxed: fine-tune each candidate this many times, each with its own shuffle, and compare "
        "mean validation accuracies (default 1)",
    )
    lowrank.add_argument(
        "--projection",
        choices=("euclidean", "cost", "both"),
        default="euclidean",
        help="relaxed: the descent's metric; cost moves masks by gradient per MAC and finds lower-loss "
        "ranks at tight budgets, both keeps the roundings of the two (default euclidean)",
    )
    lowrank.add_argument(
        "--scheme", choices=("zhang", "tai"), default="zhang", help="how convolutions are matricized (default zhang)"
    )
    lowrank.add_argument("--finetune-epochs", type=int, default=2, help="fine-tuning epochs after (default 2)")
    lowrank.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate (default 0.01)")
    lowrank.add_argument("--distill", action="store_true", help="fine-tune against the original model's soft targets")
    lowrank.add_argument("--train-subset", type=int, help="fine-tune on the first N training examples only")
    lowrank.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
    _add_data_options(lowrank)
    lowrank.set_defaults(handler=command_lowrank)

    mode_help = (
        "auto (sparse where a layer's density is low enough), sparse, dense, or LAYER_GLOB=MODE entries (default: auto)"
    )
    predict = commands.add_parser(
        "predict", help="accuracy and throughput of a .dcz file run from its compressed form", epilog=EPILOG
    )
    predict.add_argument("file", help="the .dcz file")
    predict.add_argument("--model", help="model name or package.module:factory (default: the one the file names)")
    predict.add_argument("--mode", nargs="+", help=mode_help)
    predict.add_argument("--batch-size", type=int, default=1, help="images per call (default 1)")
    predict.add_argument("--split", choices=("test", "validation"), default="test", help="which split (default test)")
    _add_data_options(predict)
    predict.set_defaults(handler=command_predict)

    bench = commands.add_parser(
        "bench", help="latency at batch 1, 8 and 64: dense against compressed, in the same run", epilog=EPILOG
    )
    bench.add_argument("file", help="the .dcz file")
    bench.add_argument("--model", help="model name or package.module:factory (default: the one the file names)")
    bench.add_argument("--mode", nargs="+", help=mode_help)
    bench.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64], help="batch sizes (default 1 8 64)")
    bench.add_argument("--repeats", type=int, default=100, help="timed calls per batch size (default 100)")
    bench.add_argument(
        "--input-shape", type=int, nargs="+", default=[1, 28, 28], help="one example's shape (default 1 28 28)"
    )
    bench.add_argument(
        "--layers",
        action="store_true",
        help="also time each weight layer alone, dense against compressed, at the first --batch size",
    )
    bench.set_defaults(handler=command_bench)

    sensitivity = commands.add_parser(
        "sensitivity", help="validation accuracy against sparsity for each layer alone (table and plot)", epilog=EPILOG
    )
    sensitivity.add_argument("checkpoint", help="the trained model's checkpoint")
    sensitivity.add_argument("--model", help="model name or package.module:factory")
    sensitivity.add_argument("--layers", nargs="+", metavar="PATTERN", help="layers to analyse (default: all)")
    sensitivity.add_argument(
        "--max-drop",
        type=float,
        default=0.005,
        help="accuracy drop allowed per layer for the suggestion (default 0.005 = 0.5 points)",
    )
    sensitivity.add_argument("--out-dir", default="runs/sensitivity", help="where the PNG and JSON go")
    _add_data_options(sensitivity)
    sensitivity.set_defaults(handler=command_sensitivity)

    reference = commands.add_parser(
        "reference", help="the cached reference model for a registered network (trained on first use)", epilog=EPILOG
    )
    reference.add_argument("model", nargs="?", default="lenet-300-100", help="registered model name")
    reference.add_argument("--cache-dir", help="cache directory (default: $DEEPSHRINK_CACHE or ~/.cache/deepshrink)")
    _add_data_options(reference)
    reference.set_defaults(handler=command_reference)

    info = commands.add_parser("info", help="versions, data location, cache and registered models", epilog=EPILOG)
    info.add_argument("--data-dir", help="data directory to check")
    info.set_defaults(handler=command_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except DeepshrinkError as error:
        print(f"deepshrink: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("deepshrink: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
