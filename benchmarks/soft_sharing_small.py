"""Soft weight-sharing on a small problem: LeNet-300-100 trained 3 epochs on 5,000 Fashion-MNIST
examples, then `deepshrink.run` with each quantize section given, one per line of output: the
file's ratio, the test accuracy decoded from it, and per layer the bits and kept fraction.

    .venv/bin/python benchmarks/soft_sharing_small.py \\
        '{"method": "soft", "soft_epochs": 3, "finetune_epochs": 0, "prior_learning_rate": 0.003}' \\
        '{"method": "soft", "soft_epochs": 10, "finetune_epochs": 1, "prior_learning_rate": 0.003}' \\
        '{"method": "soft", "soft_epochs": 10, "finetune_epochs": 1}'
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

import deepshrink
from deepshrink.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("quantize", nargs="+", help="a quantize section as JSON")
    args = parser.parse_args()
    small = deepshrink.load_data(train_subset=5000)
    torch.manual_seed(0)
    reference = build_model("lenet-300-100")
    loader = deepshrink.make_loader(small.train, 128, shuffle=True, seed=0)
    deepshrink.fit(reference, loader, deepshrink.TrainConfig(epochs=3), progress=False)
    for section in args.quantize:
        recipe = {"seed": 0, "quantize": json.loads(section)}
        with tempfile.TemporaryDirectory() as directory:
            result = deepshrink.run(
                reference, recipe, small, run_dir=directory, model_name="lenet-300-100", progress=False
            )
        stage = next(stage for stage in result.stages if stage.name == "quantize")
        layers = [(row["layer"], row["bits"], round(row["kept_fraction"], 3)) for row in stage.result.log["layers"]]
        mixtures = stage.result.log["mixture_means"]
        means = {name: [round(mean, 4) for mean in values] for name, values in mixtures.items()}
        print(
            f"{section}: reference {result.reference_metric:.4f}, decoded {result.compressed_metric:.4f}, "
            f"{result.ratio:.1f}x; (layer, bits, kept) {layers}; mixture means "
            f"{means}",
            flush=True,
        )


if __name__ == "__main__":
    main()
