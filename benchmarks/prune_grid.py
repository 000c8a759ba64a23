"""Magnitude pruning + retraining over a small grid, selected on validation, reported on test.

Each configuration starts from the cached reference, prunes to per-layer sparsities over
several rounds with retraining, and is scored on the 5,000-image validation split. The one
with the best validation accuracy among those at or under the kept-weights budget is the
result; its test accuracy is reported against the reference's. The test set never takes part
in the choice.

    .venv/bin/python benchmarks/prune_grid.py lenet-300-100
    .venv/bin/python benchmarks/prune_grid.py lenet-5 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from deepshrink.checkpoint import save_checkpoint
from deepshrink.data import load_data, make_loader
from deepshrink.prune.schedule import iterative_pruning, per_layer_sparsity_rule
from deepshrink.prune.statistics import format_table, layer_statistics, totals
from deepshrink.references import reference_model
from deepshrink.train import TrainConfig, evaluate

# (name, per-layer final sparsities, rounds, epochs per round, learning rate)
GRIDS = {
    "lenet-300-100": [
        ("paper-split lr0.02", {"fc1": 0.925, "fc2": 0.91, "fc3": 0.75}, 6, 8, 0.02),
        ("fc1-heavy lr0.02", {"fc1": 0.93, "fc2": 0.88, "fc3": 0.6}, 6, 8, 0.02),
        ("fc1-heavy lr0.05", {"fc1": 0.93, "fc2": 0.88, "fc3": 0.6}, 6, 10, 0.05),
        ("fc1-heavy lr0.01 8 rounds", {"fc1": 0.93, "fc2": 0.88, "fc3": 0.6}, 8, 8, 0.01),
    ],
    "lenet-5": [
        ("paper-split lr0.02", {"conv1": 0.34, "conv2": 0.88, "fc1": 0.93, "fc2": 0.81}, 6, 8, 0.02),
        ("conv-light lr0.02", {"conv1": 0.2, "conv2": 0.8, "fc1": 0.935, "fc2": 0.7}, 6, 8, 0.02),
    ],
}
BUDGET = 0.08  # at most 8% of the weights kept


def run_one(model_name: str, config: tuple, seed: int) -> dict:
    torch.set_num_threads(1)
    label, sparsities, rounds, epochs, learning_rate = config
    data = load_data()
    reference = reference_model(model_name, data, progress=False)
    model = reference.model
    started = time.perf_counter()
    history = iterative_pruning(
        model,
        make_loader(data.train, 128, shuffle=True, seed=seed),
        make_loader(data.validation, 1000, shuffle=False),
        per_layer_sparsity_rule(sparsities),
        rounds=rounds,
        retrain=TrainConfig(epochs=epochs, learning_rate=learning_rate, weight_decay=5e-4, seed=seed),
        progress=False,
    )
    rows = layer_statistics(model, data.test.tensors[0][:2])
    return {
        "label": label,
        "sparsities": sparsities,
        "rounds": rounds,
        "epochs_per_round": epochs,
        "learning_rate": learning_rate,
        "kept_fraction": totals(rows)["kept_fraction"],
        "reference_validation": history.reference_accuracy,
        "validation": history.rounds[-1].accuracy_after_retraining,
        "reference_test": reference.test_accuracy,
        "test": evaluate(model, make_loader(data.test, 1000, shuffle=False)).accuracy,
        "seconds": time.perf_counter() - started,
        "table": format_table(rows, markdown=True),
        "state_dict": {name: tensor.clone() for name, tensor in model.state_dict().items()},
        "rounds_log": [vars(record) for record in history.rounds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(GRIDS))
    parser.add_argument("--jobs", type=int, default=2, help="configurations run in parallel, one thread each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result and checkpoint")
    args = parser.parse_args()
    reference_model(args.model, load_data())  # train the reference once, before the workers need it
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(
            pool.map(
                run_one, [args.model] * len(GRIDS[args.model]), GRIDS[args.model], [args.seed] * len(GRIDS[args.model])
            )
        )
    eligible = [result for result in results if result["kept_fraction"] <= BUDGET]
    chosen = max(eligible, key=lambda result: result["validation"])
    print("| configuration | kept | validation | test | test drop | time |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for result in results:
        mark = " (chosen on validation)" if result is chosen else ""
        print(
            f"| {result['label']}{mark} | {100 * result['kept_fraction']:.2f}% | {100 * result['validation']:.2f}% "
            f"| {100 * result['test']:.2f}% | {100 * (result['reference_test'] - result['test']):.2f} "
            f"| {result['seconds']:.0f} s |"
        )
    print(
        f"\nreference: validation {100 * chosen['reference_validation']:.2f}%, "
        f"test {100 * chosen['reference_test']:.2f}%"
    )
    print(chosen["table"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = [{key: value for key, value in result.items() if key != "state_dict"} for result in results]
    (out / f"prune_{args.model}.json").write_text(json.dumps({"chosen": chosen["label"], "results": summary}, indent=2))
    from deepshrink.models import build_model
    from deepshrink.prune.module import restore_pruning

    model = restore_pruning(build_model(args.model), chosen["state_dict"])
    model.load_state_dict(chosen["state_dict"])
    save_checkpoint(
        Path("runs") / f"{args.model}-pruned.safetensors",
        model,
        model_name=args.model,
        metadata={"stage": "pruned", "test_accuracy": chosen["test"], "configuration": chosen["label"]},
    )


if __name__ == "__main__":
    main()
