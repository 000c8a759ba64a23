"""Figure 6 with sparse variational dropout's frontier beside Deep Compression's (issue 22).

From a model's cached reference (trained first if missing), the Figure 6 sweep of the model's
shipped recipe (pruning only, quantization only, both, SVD; one epoch of retraining a point)
plus sparse variational dropout at each KL weight given (VARIATIONAL_EPOCHS epochs from the
reference, then one epoch with the masks fixed, then the sweep's `combined_bits`) and soft
weight-sharing at each tau given, if any (10 epochs under the prior, 17 components), all on the
same reference, seed and data, sized from real encodings, measured on the test split. Writes
results/frontier-MODEL.json and results/frontier-MODEL.png (the report's Figure 6 plot).

    .venv/bin/python benchmarks/frontier.py [--model lenet-300-100] [--kl-weights 0.5 1 1.5 2]
        [--soft-taus 0.002 0.005 0.02] [--only-new] [--out-name NAME]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIATIONAL_EPOCHS = 20  # the shipped variational recipes'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet-300-100")
    parser.add_argument("--kl-weights", type=float, nargs="*", default=[0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--epochs", type=int, default=VARIATIONAL_EPOCHS)
    parser.add_argument("--soft-taus", type=float, nargs="*", default=[])
    parser.add_argument("--only-new", action="store_true", help="leave out the paper's methods and SVD")
    parser.add_argument("--out-name", default=None, help="results/NAME.json and .png (default frontier-MODEL)")
    args = parser.parse_args()
    import deepshrink
    from deepshrink.recipe import load_recipe
    from deepshrink.report.figures import plot_tradeoff
    from deepshrink.runtime.bench import machine_description
    from deepshrink.stages import Loaders
    from deepshrink.tradeoff import tradeoff_curves

    recipe = load_recipe(args.model)
    data = deepshrink.load_data()
    reference = deepshrink.reference_model(args.model, data).model
    settings = dataclasses.replace(
        recipe.tradeoff,
        variational_kl_weights=args.kl_weights,
        variational_epochs=args.epochs,
        soft_taus=args.soft_taus,
    )
    if args.only_new:
        settings = dataclasses.replace(settings, sparsities=[], bits=[], svd_budgets=[])
    started = time.perf_counter()
    curves = tradeoff_curves(reference, settings, recipe.encode, Loaders.from_splits(data), seed=recipe.seed)
    curves |= {
        "seconds": time.perf_counter() - started,
        "settings": dataclasses.asdict(settings),
        "machine": machine_description(),
        "command": " ".join(sys.argv),
    }
    stem = HERE / "results" / (args.out_name or f"frontier-{args.model}")
    Path(f"{stem}.json").write_text(json.dumps(curves, indent=1) + "\n")
    plot_tradeoff(curves, f"{stem}.png")
    reference_metric = curves["reference_metric"]
    for point in sorted(curves["points"], key=lambda point: (point["method"], point["ratio"])):
        change = 100 * (point["metric"] - reference_metric)
        print(f"{point['method']:36} {point['setting']:28} {point['ratio']:7.1f}x {change:+6.2f} points")
    print(f"wrote {stem}.json and .png in {curves['seconds']:.0f} s")


if __name__ == "__main__":
    main()
