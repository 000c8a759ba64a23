"""The quantization numbers of issue 4, on the Fashion-MNIST test set.

Sections (all by default):
  pruned       pruned LeNet-300-100 at 6 bits and pruned LeNet-5 at 8 (conv) / 5 (fc) bits,
               before and after centroid fine-tuning, against the pruned model
  inits        linear / density / forgy initialisation on pruned LeNet-300-100 at 3 and 6 bits
  bits         quantization only (no pruning) at 2, 3, 4, 5, 6 and 8 bits, both LeNets
  comparators  BinaryConnect, a binarized network, fixed-point training at 8 and 16 bits

The pruned inputs are the checkpoints that benchmarks/prune_grid.py writes to runs/.

    .venv/bin/python benchmarks/quantize_tables.py [--section NAME ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deepshrink.checkpoint import load_model
from deepshrink.data import load_data, make_loader
from deepshrink.quantize.binary import binary_connect, binary_mlp, clip_real_weights
from deepshrink.quantize.fixed_point import FixedPointFormat, FixedPointParameters, quantize_fixed_point
from deepshrink.quantize.shared import share_weights
from deepshrink.references import reference_model
from deepshrink.train import TrainConfig, evaluate, fit

FINETUNE = TrainConfig(epochs=3, learning_rate=1e-4, weight_decay=0.0, optimizer="adam")


def share_and_tune(model, data, bits, init, epochs):
    test = make_loader(data.test, 1000, shuffle=False)
    before = evaluate(model, test).metric
    share_weights(model, bits, init)
    shared = evaluate(model, test).metric
    if epochs:
        config = TrainConfig(epochs=epochs, learning_rate=1e-4, weight_decay=0.0, optimizer="adam")
        fit(model, make_loader(data.train, 128, shuffle=True), config, progress=False)
    return before, shared, evaluate(model, test).metric


def section_pruned(data):
    """Sharing plus fine-tuning, the number of fine-tuning epochs (0 to 3) chosen on validation."""
    rows = []
    validation = make_loader(data.validation, 1000, shuffle=False)
    test = make_loader(data.test, 1000, shuffle=False)
    train = make_loader(data.train, 128, shuffle=True)
    one_epoch = TrainConfig(epochs=1, learning_rate=1e-4, weight_decay=0.0, optimizer="adam", schedule="constant")
    for name, bits in (("lenet-300-100", {"*": 6}), ("lenet-5", None)):
        model, _ = load_model(f"runs/{name}-pruned.safetensors")
        pruned = evaluate(model, test).metric
        share_weights(model, bits, "linear")
        optimizer = torch.optim.Adam(
            [parameter for parameter in model.parameters() if parameter.requires_grad], lr=1e-4
        )
        epochs = [(0, evaluate(model, validation).metric, evaluate(model, test).metric)]
        for epoch in range(1, 4):
            fit(model, train, one_epoch, optimizer=optimizer, progress=False)
            epochs.append((epoch, evaluate(model, validation).metric, evaluate(model, test).metric))
        chosen = max(epochs, key=lambda row: (row[1], -row[0]))
        rows.append(
            {
                "model": name,
                "bits": "6" if bits else "8 conv / 5 fc",
                "pruned": pruned,
                "epochs": [{"epoch": e, "validation": v, "test": t} for e, v, t in epochs],
                "chosen_epochs": chosen[0],
                "fine_tuned": chosen[2],
                "loss_points": 100 * (pruned - chosen[2]),
            }
        )
        trail = ", ".join(f"{e}: val {100 * v:.2f} / test {100 * t:.2f}" for e, v, t in epochs)
        print(
            f"| {name} | {rows[-1]['bits']} | {100 * pruned:.2f}% | {100 * epochs[0][2]:.2f}% | {chosen[0]} "
            f"| {100 * chosen[2]:.2f}% | {rows[-1]['loss_points']:+.2f} | {trail} |",
            flush=True,
        )
    return rows


def section_inits(data):
    rows = []
    for bits in (3, 6):
        for init in ("linear", "density", "forgy"):
            model, _ = load_model("runs/lenet-300-100-pruned.safetensors")
            before, shared, tuned = share_and_tune(model, data, {"*": bits}, init, FINETUNE.epochs)
            rows.append({"bits": bits, "init": init, "pruned": before, "shared": shared, "fine_tuned": tuned})
            print(f"| {bits} | {init} | {100 * shared:.2f}% | {100 * tuned:.2f}% |", flush=True)
    return rows


def section_bits(data):
    rows = []
    for name in ("lenet-300-100", "lenet-5"):
        for bits in (2, 3, 4, 5, 6, 8):
            model = reference_model(name, data, progress=False).model
            before, shared, tuned = share_and_tune(model, data, {"*": bits}, "linear", 2)
            rows.append({"model": name, "bits": bits, "reference": before, "shared": shared, "fine_tuned": tuned})
            print(f"| {name} | {bits} | {100 * before:.2f}% | {100 * shared:.2f}% | {100 * tuned:.2f}% |", flush=True)
    return rows


def section_comparators(data):
    rows = []
    train = make_loader(data.train, 128, shuffle=True)
    test = make_loader(data.test, 1000, shuffle=False)
    config = TrainConfig(epochs=20, learning_rate=0.01, weight_decay=0.0, optimizer="adam")

    def record(label, model):
        accuracy = evaluate(model, test).metric
        rows.append({"method": label, "test_accuracy": accuracy})
        print(f"| {label} | {100 * accuracy:.2f}% |", flush=True)

    for label, stochastic in (("BinaryConnect, deterministic", False), ("BinaryConnect, stochastic", True)):
        torch.manual_seed(0)
        model = binary_connect(binary_mlp(), stochastic=stochastic)
        fit(model, train, config, after_step=clip_real_weights, progress=False)
        record(label, model)
    torch.manual_seed(0)
    model = binary_connect(binary_mlp(binarize_activations=True))
    fit(model, train, config, after_step=clip_real_weights, progress=False)
    record("binarized network (weights and activations)", model)
    for bits, number_format in ((16, FixedPointFormat(4, 12)), (8, FixedPointFormat(2, 6))):
        for rounding in ("nearest", "stochastic"):
            torch.manual_seed(0)
            model = reference_model("lenet-300-100", data, progress=False).model.__class__()
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.copy_(quantize_fixed_point(parameter, number_format, rounding))
            sgd = TrainConfig(epochs=20, learning_rate=0.05, weight_decay=0.0)
            fit(model, train, sgd, after_step=FixedPointParameters(number_format, rounding), progress=False)
            record(
                f"fixed point {bits}-bit <{number_format.integer_bits},{number_format.fraction_bits}>, "
                f"{rounding} rounding, trained from scratch",
                model,
            )
    return rows


SECTIONS = {"pruned": section_pruned, "inits": section_inits, "bits": section_bits, "comparators": section_comparators}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", nargs="+", choices=sorted(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data()
    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    for section in args.section:
        started = time.perf_counter()
        print(f"\n## {section}", flush=True)
        rows = SECTIONS[section](data)
        print(f"({time.perf_counter() - started:.0f} s)", flush=True)
        (out / f"quantize_{section}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
