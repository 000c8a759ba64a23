"""What an ensemble teacher is worth before any compression: the registered model's references
at seeds 0 to N-1 (trained by its reference settings and cached, as `teacher: {references: N}`
does), each and their ensemble (logits averaged) on the validation and test splits; then dense
copies of the model trained by the same settings, distilled from that ensemble, at the seeds
given.

The second part says how much of a compressed student's gain from the ensemble a dense network
would get as well (BENCHMARKS.md, "An ensemble of references as the teacher").

    .venv/bin/python benchmarks/ensemble_teacher.py lenet-300-100 --references 5 --dense-seeds 0 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from deepshrink import load_data, make_loader
from deepshrink.distill import DistillationLoss
from deepshrink.models import build_model, get_model_spec
from deepshrink.references import reference_model
from deepshrink.teachers import Ensemble
from deepshrink.train import evaluate, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a registered model name, e.g. lenet-300-100")
    parser.add_argument("--references", type=int, default=5, help="the ensemble's size")
    parser.add_argument("--dense-seeds", type=int, nargs="*", default=[0], help="seeds of the distilled dense copies")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    arguments = parser.parse_args()
    data = load_data()
    splits = {
        "validation": make_loader(data.validation, 1000, shuffle=False),
        "test": make_loader(data.test, 1000, shuffle=False),
    }

    def scores(model) -> dict[str, float]:
        return {name: evaluate(model, loader, "cpu").metric for name, loader in splits.items()}

    members, each = [], []
    for seed in range(arguments.references):
        # Seed 0 is the reference settings' own seed: the cached reference itself.
        members.append(reference_model(arguments.model, data, seed=seed or None, device="cpu", progress=False).model)
        each.append(scores(members[-1]))
        print(f"reference seed {seed}: validation {each[-1]['validation']:.2%} test {each[-1]['test']:.2%}", flush=True)
    for name in splits:
        values = [measured[name] for measured in each]
        print(f"{name}: mean {statistics.mean(values):.2%}, standard deviation {100 * statistics.stdev(values):.2f}")
    ensemble = Ensemble(members)
    measured = scores(ensemble)
    print(f"ensemble of {len(members)}: validation {measured['validation']:.2%} test {measured['test']:.2%}")

    settings = get_model_spec(arguments.model).reference_training
    for seed in arguments.dense_seeds:
        config = dataclasses.replace(settings, seed=seed)
        with torch.random.fork_rng(devices=[]):  # the same initialisation as the reference at this seed
            torch.manual_seed(seed)
            model = build_model(arguments.model)
        loader = make_loader(data.train, config.batch_size, shuffle=True, seed=seed)
        criterion = DistillationLoss(ensemble, arguments.temperature, arguments.alpha)
        fit(model, loader, config, criterion=criterion, progress=False)
        measured = scores(model)
        print(
            f"dense, distilled from the ensemble, seed {seed}: validation {measured['validation']:.2%} "
            f"test {measured['test']:.2%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
