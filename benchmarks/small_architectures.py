"""Small architectures against the LeNets on Fashion-MNIST: parameters, MACs, accuracy.

Each network is the registry's reference (trained once with its registered settings and cached,
like the LeNets), so `deepshrink run squeezenet` afterwards compresses the same model.

    .venv/bin/python benchmarks/small_architectures.py [--models squeezenet mobilenet ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deepshrink.data import load_data
from deepshrink.prune.statistics import layer_statistics
from deepshrink.references import reference_model

MODELS = ["lenet-300-100", "lenet-5", "lenet-5-flattened", "squeezenet", "mobilenet"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--out", default="benchmarks/results/small_architectures.json")
    args = parser.parse_args()
    data = load_data()
    results = []
    for name in args.models:
        trained = reference_model(name, data, progress=False)
        model = trained.model.cpu()
        rows = layer_statistics(model, data.test.tensors[0][:2])
        row = {
            "model": name,
            "parameters": sum(parameter.numel() for parameter in model.parameters()),
            "multiply_accumulates": sum(statistic.multiply_accumulates for statistic in rows),
            "test_accuracy": trained.test_metric,
            "validation_accuracy": trained.validation_metric,
            "train_seconds": trained.seconds,
        }
        results.append(row)
        print(
            f"{name:18s} {row['parameters']:>9,} parameters  {row['multiply_accumulates']:>10,} MACs  "
            f"test {100 * row['test_accuracy']:.2f}%  (trained in {row['train_seconds']:.0f} s)",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
