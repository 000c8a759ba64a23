"""Magnitude pruning + retraining over a small grid, selected on validation, reported on test.

Each configuration starts from the cached reference, prunes to per-layer sparsities over
several rounds with retraining, and is scored on the 5,000-image validation split. The one
with the best validation accuracy among those at or under the kept-weights budget is the
result; its test accuracy is reported against the reference's. The test set never takes part
in the choice.

    .venv/bin/python benchmarks/prune_grid.py lenet-300-100
    .venv/bin/python benchmarks/prune_grid.py lenet-5 --jobs 2
    .venv/bin/python benchmarks/prune_grid.py lenet-300-100 --surgery --out benchmarks/results/surgery
"""

from __future__ import annotations

import argparse
import json
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from deepshrink.checkpoint import save_checkpoint
from deepshrink.data import load_data, make_loader
from deepshrink.distill import DistillationLoss
from deepshrink.prune.schedule import global_sparsity_rule, iterative_pruning, per_layer_sparsity_rule
from deepshrink.prune.statistics import format_table, layer_statistics, totals
from deepshrink.prune.surgery import dynamic_network_surgery
from deepshrink.references import reference_model
from deepshrink.train import TrainConfig, evaluate, fit

# label -> (rule, sparsity: per-layer dict or one global fraction, rounds, epochs per round, learning rate,
#           distill from the reference). For rule "dns" (Dynamic Network Surgery, sparsity giving each
#           layer's initial threshold quantile) "rounds" is the number of fixed-mask epochs after the
#           surgery epochs.
DNS_FC = {"fc1": 0.98, "fc2": 0.96, "fc3": 0.75}
GRIDS = {
    "lenet-300-100": {
        "paper-split lr0.02": ("per-layer", {"fc1": 0.925, "fc2": 0.91, "fc3": 0.75}, 6, 8, 0.02, False),
        "fc1-heavy lr0.02": ("per-layer", {"fc1": 0.93, "fc2": 0.88, "fc3": 0.6}, 6, 8, 0.02, False),
        "fc1-heavy lr0.05": ("per-layer", {"fc1": 0.93, "fc2": 0.88, "fc3": 0.6}, 6, 10, 0.05, False),
        "fc1-heavy lr0.01 8 rounds": ("per-layer", {"fc1": 0.93, "fc2": 0.88, "fc3": 0.6}, 8, 8, 0.01, False),
        "fc1-heavy lr0.05 distilled": ("per-layer", {"fc1": 0.93, "fc2": 0.88, "fc3": 0.6}, 6, 10, 0.05, True),
        "fc1-heavy lr0.02 distilled": ("per-layer", {"fc1": 0.93, "fc2": 0.88, "fc3": 0.6}, 6, 8, 0.02, True),
        "dns 98/96/75 40+10 distilled": ("dns", DNS_FC, 10, 40, 0.02, True),
        "dns 98/96/75 60+10 distilled": ("dns", DNS_FC, 10, 60, 0.02, True),
        "dns 97.5/95/75 40+10 distilled": ("dns", {"fc1": 0.975, "fc2": 0.95, "fc3": 0.75}, 10, 40, 0.02, True),
        "dns 98.5/97/80 40+10 distilled": ("dns", {"fc1": 0.985, "fc2": 0.97, "fc3": 0.8}, 10, 40, 0.02, True),
    },
    "lenet-5": {
        "paper-split lr0.02": (
            "per-layer",
            {"conv1": 0.34, "conv2": 0.88, "fc1": 0.93, "fc2": 0.81},
            6,
            8,
            0.02,
            False,
        ),
        "conv-light lr0.02": ("per-layer", {"conv1": 0.2, "conv2": 0.8, "fc1": 0.935, "fc2": 0.7}, 6, 8, 0.02, False),
        "conv-light lr0.02 distilled": (
            "per-layer",
            {"conv1": 0.2, "conv2": 0.8, "fc1": 0.935, "fc2": 0.7},
            6,
            8,
            0.02,
            True,
        ),
        "global 92.5% lr0.02": ("global", 0.925, 6, 8, 0.02, False),
        "conv-light lr0.05 6x10 distilled": (
            "per-layer",
            {"conv1": 0.2, "conv2": 0.8, "fc1": 0.935, "fc2": 0.7},
            6,
            10,
            0.05,
            True,
        ),
    },
}
BUDGET = 0.08  # at most 8% of the weights kept


def run_one(model_name: str, label: str, seed: int) -> dict:
    torch.set_num_threads(1)
    rule_name, sparsity, rounds, epochs, learning_rate, distill = GRIDS[model_name][label]
    data = load_data()
    reference = reference_model(model_name, data, progress=False)
    model = reference.model
    criterion = None
    if distill:
        teacher = reference_model(model_name, data, progress=False).model
        criterion = DistillationLoss(teacher, temperature=4.0, alpha=0.5)
    started = time.perf_counter()
    if rule_name == "dns":
        return _surgery(model_name, label, seed, data, reference, criterion, started)
    rule = per_layer_sparsity_rule(sparsity) if rule_name == "per-layer" else global_sparsity_rule(sparsity)
    history = iterative_pruning(
        model,
        make_loader(data.train, 128, shuffle=True, seed=seed),
        make_loader(data.validation, 1000, shuffle=False),
        rule,
        rounds=rounds,
        retrain=TrainConfig(epochs=epochs, learning_rate=learning_rate, weight_decay=5e-4, seed=seed),
        criterion=criterion,
        progress=False,
    )
    rows = layer_statistics(model, data.test.tensors[0][:2])
    return {
        "label": label,
        "rule": rule_name,
        "sparsities": sparsity,
        "distilled": distill,
        "rounds": rounds,
        "epochs_per_round": epochs,
        "learning_rate": learning_rate,
        "kept_fraction": totals(rows)["kept_fraction"],
        "reference_validation": history.reference_metric,
        "validation": history.rounds[-1].metric_after_retraining,
        "reference_test": reference.test_metric,
        "test": evaluate(model, make_loader(data.test, 1000, shuffle=False)).metric,
        "seconds": time.perf_counter() - started,
        "table": format_table(rows, markdown=True),
        "state_dict": {name: tensor.clone() for name, tensor in model.state_dict().items()},
        "rounds_log": [vars(record) for record in history.rounds],
    }


def _file_name(model_name: str, label: str) -> str:
    """A checkpoint file name for a configuration label ("dns 98/96/75 ..." has slashes)."""
    return f"{model_name}-{re.sub(r'[^A-Za-z0-9.]+', '_', label)}.pt"


def _surgery(model_name, label, seed, data, reference, criterion, started) -> dict:
    _, thresholds, fixed_epochs, epochs, learning_rate, distill = GRIDS[model_name][label]
    model = reference.model
    validation = make_loader(data.validation, 1000, shuffle=False)
    reference_validation = evaluate(model, validation).metric
    train = make_loader(data.train, 128, shuffle=True, seed=seed)
    result = dynamic_network_surgery(
        model,
        train,
        TrainConfig(epochs=epochs, learning_rate=learning_rate, weight_decay=5e-4, seed=seed),
        sparsities=thresholds,
        criterion=criterion,
        progress=False,
    )
    if fixed_epochs:
        fit(
            model,
            train,
            TrainConfig(epochs=fixed_epochs, learning_rate=learning_rate / 2, weight_decay=5e-4, seed=seed),
            criterion=criterion,
            progress=False,
        )
    rows = layer_statistics(model, data.test.tensors[0][:2])
    return {
        "label": label,
        "rule": "dns",
        "sparsities": thresholds,
        "distilled": distill,
        "rounds": fixed_epochs,
        "epochs_per_round": epochs,
        "learning_rate": learning_rate,
        "kept_fraction": totals(rows)["kept_fraction"],
        "reference_validation": reference_validation,
        "validation": evaluate(model, validation).metric,
        "reference_test": reference.test_metric,
        "test": evaluate(model, make_loader(data.test, 1000, shuffle=False)).metric,
        "seconds": time.perf_counter() - started,
        "table": format_table(rows, markdown=True),
        "state_dict": {name: tensor.clone() for name, tensor in model.state_dict().items()},
        "spliced": result.spliced,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(GRIDS))
    parser.add_argument("--jobs", type=int, default=2, help="configurations run in parallel, one thread each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result and checkpoint")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="LABEL",
        help="run these configurations only, and merge "
        "them into the results already in --out (selection is over all of them)",
    )
    parser.add_argument(
        "--surgery",
        action="store_true",
        help="run the Dynamic Network Surgery configurations (not in the default grid)",
    )
    args = parser.parse_args()
    surgery = [label for label, entry in GRIDS[args.model].items() if entry[0] == "dns"]
    labels = args.only or (surgery if args.surgery else [label for label in GRIDS[args.model] if label not in surgery])
    unknown = set(labels) - set(GRIDS[args.model])
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; choose from {list(GRIDS[args.model])}")
    reference_model(args.model, load_data())  # train the reference once, before the workers need it
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run_one, [args.model] * len(labels), labels, [args.seed] * len(labels)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result_path = out / f"prune_{args.model}.json"
    checkpoints = Path("runs") / "prune_grid"
    checkpoints.mkdir(parents=True, exist_ok=True)
    for result in results:
        torch.save(result.pop("state_dict"), checkpoints / _file_name(args.model, result["label"]))
    if args.only and result_path.exists():
        earlier = [row for row in json.loads(result_path.read_text())["results"] if row["label"] not in labels]
        results = earlier + results
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
    result_path.write_text(json.dumps({"chosen": chosen["label"], "results": results}, indent=2))
    from deepshrink.models import build_model
    from deepshrink.prune.module import restore_pruning

    state = torch.load(checkpoints / _file_name(args.model, chosen["label"]), weights_only=True)
    model = restore_pruning(build_model(args.model), state)
    model.load_state_dict(state)
    save_checkpoint(
        Path("runs") / f"{args.model}-pruned.safetensors",
        model,
        model_name=args.model,
        metadata={"stage": "pruned", "test_accuracy": chosen["test"], "configuration": chosen["label"]},
    )


if __name__ == "__main__":
    main()
