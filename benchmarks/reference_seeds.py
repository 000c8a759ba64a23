"""How much the reference itself moves with its seed: a registered model trained with its own
reference settings (as `deepshrink run` trains and caches it, seed 0) at other seeds, each
measured on the validation and test splits.

A compression target such as issue 22's "a mean test drop of at most 0.3 points" is measured
against one reference; this says whether that reference sits high, low or in the middle of what
the same training gives at other seeds, and how wide that spread is beside the target.

    .venv/bin/python benchmarks/reference_seeds.py lenet-300-100 --seeds 0 1 2 3 4 5

Prints one line per seed (validation, test, seconds) and the mean and spread of each. Nothing
is cached: the cached reference is left as it is (seed 0 trains the same network again).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from deepshrink import load_data, make_loader
from deepshrink.models import get_model_spec
from deepshrink.references import train_model
from deepshrink.train import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a registered model name, e.g. lenet-300-100")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    arguments = parser.parse_args()
    data = load_data()
    settings = get_model_spec(arguments.model).reference_training
    validation_loader = make_loader(data.validation, 1000, shuffle=False)
    test_loader = make_loader(data.test, 1000, shuffle=False)
    print(f"{arguments.model}: {settings}")
    validations, tests = [], []
    for seed in arguments.seeds:
        model, seconds = train_model(arguments.model, data, dataclasses.replace(settings, seed=seed), progress=False)
        validations.append(evaluate(model, validation_loader, "cpu").metric)
        tests.append(evaluate(model, test_loader, "cpu").metric)
        print(f"seed {seed}: validation {validations[-1]:.2%} test {tests[-1]:.2%} ({seconds:.0f} s)", flush=True)
    if len(tests) > 1:
        for name, values in (("validation", validations), ("test", tests)):
            print(
                f"{name}: mean {statistics.mean(values):.2%}, standard deviation "
                f"{100 * statistics.stdev(values):.2f} points, range {min(values):.2%}-{max(values):.2%}"
            )


if __name__ == "__main__":
    main()
