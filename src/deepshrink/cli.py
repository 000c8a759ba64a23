"""The `deepshrink` command line. It parses arguments and calls the library; nothing more.

Errors from the library's exception hierarchy become one-line messages with a distinct exit
code per kind (see deepshrink.errors); argparse's own usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deepshrink import __version__
from deepshrink.errors import DeepshrinkError, ModelError

EPILOG = (
    "Exit codes: 0 ok, 2 usage, 3 bad option or config, 4 data not found or unreadable, "
    "5 malformed file, 6 checkpoint problem, 7 model problem, 130 interrupted."
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
    from deepshrink.checkpoint import load_checkpoint, load_state_into
    from deepshrink.data import load_data, make_loader
    from deepshrink.models import build_model, is_factory_path
    from deepshrink.train import evaluate

    checkpoint = load_checkpoint(args.checkpoint)
    model_name = args.model or checkpoint.model_name
    if model_name is None:
        raise ModelError(
            f"{args.checkpoint}: checkpoint does not name its model; pass --model NAME or package.module:factory"
        )
    if args.model is None and is_factory_path(model_name):
        # Importing a module named inside a file would let the file run code: the user must name it.
        raise ModelError(
            f"{args.checkpoint}: checkpoint was made by the user factory {model_name!r}; "
            f"pass --model {model_name} to confirm that this code may be imported"
        )
    model = load_state_into(build_model(model_name, **checkpoint.model_config), checkpoint, args.checkpoint)
    data = load_data(args.data_dir)
    split = {"test": data.test, "validation": data.validation}[args.split]
    result = evaluate(model, make_loader(split, 1000, shuffle=False), args.device)
    print(f"model: {model_name}  split: {args.split} ({result.count} examples)")
    print(f"{args.split} accuracy: {result.accuracy:.4f}")
    print(f"{args.split} loss: {result.loss:.4f}")
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
