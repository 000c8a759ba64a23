"""Does retraining with knowledge distillation beat plain retraining for pruned LeNet-300-100?

At 2%, 3% and 4% of the weights kept (one global magnitude threshold, pruned in rounds), each
round's retraining uses either plain cross-entropy or the distillation loss with the reference
as teacher (T = 4, alpha = 0.5, Hinton et al. 2015). Same seeds, same schedule; validation and
test accuracy reported.

    .venv/bin/python benchmarks/distill_pruning.py [--rounds 6 --retrain-epochs 6]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from deepshrink import stages
from deepshrink.data import load_data
from deepshrink.recipe import DistillSettings, PruneSettings
from deepshrink.references import reference_model
from deepshrink.train import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.02, 0.03, 0.04])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--retrain-epochs", type=int, default=6)
    parser.add_argument("--out", default="benchmarks/results/distill_pruning.json")
    args = parser.parse_args()
    data = load_data()
    loaders = stages.Loaders.from_splits(data)
    reference = reference_model("lenet-300-100", data, progress=False).model
    results = []
    for density in args.densities:
        for distill in (None, DistillSettings(temperature=4.0, alpha=0.5)):
            started = time.perf_counter()
            model = copy.deepcopy(reference)
            settings = PruneSettings(
                global_sparsity=1 - density,
                rounds=args.rounds,
                retrain_epochs=args.retrain_epochs,
                learning_rate=0.05,
                distill=distill,
            )
            stages.prune(model, settings, loaders, progress=False)
            row = {
                "density": density,
                "retraining": "distilled" if distill else "plain",
                "validation_accuracy": evaluate(model, loaders.validation).metric,
                "test_accuracy": evaluate(model, loaders.test).metric,
                "seconds": time.perf_counter() - started,
            }
            results.append(row)
            print(
                f"{100 * density:.0f}% kept, {row['retraining']:9s}: validation {100 * row['validation_accuracy']:.2f}%"
                f"  test {100 * row['test_accuracy']:.2f}%  ({row['seconds']:.0f} s)",
                flush=True,
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
