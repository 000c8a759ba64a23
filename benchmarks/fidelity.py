"""How closely compressed classifiers follow their reference, on one split of the default data.

    .venv/bin/python benchmarks/fidelity.py RUN_DIR/MODEL.dcz ... [--split validation]

For each file: top-1 accuracy, cross-entropy, agreement with the reference's top-1, and
KL(reference || compressed) at temperature 1. On a 5,000-example validation split accuracy moves
by about 0.3 points from one run to the next; the cross-entropy and the KL to the reference
move much less from run to run. They are still one split's measures: on LeNet-300-100 a lower
validation KL did not carry over to test (BENCHMARKS.md, "Distillation on mixed examples").
Choose on `validation`; `test` is for reporting only.
The reference is the cached one for the file's model (trained when missing).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from deepshrink.compressed import load_compressed
from deepshrink.data import load_data
from deepshrink.references import reference_model


def statistics(model: nn.Module, reference: nn.Module, split: torch.utils.data.TensorDataset) -> dict:
    """A classifier's fidelity on one split.

    Args:
        model: the compressed model.
        reference: the model it was compressed from.
        split: (inputs, labels).

    Returns:
        accuracy, cross_entropy, agreement and kl (reference || model), over the split.
    """
    inputs, labels = split.tensors
    model.eval()
    reference.eval()
    with torch.no_grad():
        outputs, reference_outputs = model(inputs), reference(inputs)
    return {
        "accuracy": (outputs.argmax(1) == labels).double().mean().item(),
        "cross_entropy": nn.functional.cross_entropy(outputs, labels).item(),
        "agreement": (outputs.argmax(1) == reference_outputs.argmax(1)).double().mean().item(),
        "kl": nn.functional.kl_div(
            outputs.log_softmax(1), reference_outputs.log_softmax(1), log_target=True, reduction="batchmean"
        ).item(),
    }


def main() -> None:
    """Print one row per file, after the reference's own row."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    args = parser.parse_args()
    data = load_data()
    split = getattr(data, args.split)
    references = {}
    print(f"| {args.split} | accuracy | cross-entropy | agreement with the reference | KL to the reference |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for path in args.files:
        model, metadata = load_compressed(path)
        name = metadata["model"]
        if name not in references:
            references[name] = reference_model(name, data, progress=False).model
            row = statistics(references[name], references[name], split)
            print(f"| reference {name} | {100 * row['accuracy']:.2f}% | {row['cross_entropy']:.4f} | | |")
        row = statistics(model, references[name], split)
        print(
            f"| {path} | {100 * row['accuracy']:.2f}% | {row['cross_entropy']:.4f} | "
            f"{100 * row['agreement']:.2f}% | {row['kl']:.4f} |"
        )


if __name__ == "__main__":
    main()
