"""Rank selection under a MAC budget on the reference LeNets: CPTV, POS and the relaxation.

For each budget (a fraction of the original MACs of the Linear and Conv2d layers) and each
method: the ranks chosen, the accuracy right after factorizing, and after fine-tuning the
factored network. Conv layers use Zhang et al.'s (C*X*Y, N) matricization. Accuracy columns
are on the test split; nothing is chosen on them.

    .venv/bin/python benchmarks/lowrank_table.py [--models lenet-300-100 lenet-5] [--finetune-epochs 2]
        [--finetune-seeds 5] [--first-seed 3] [--selection-epochs EPOCHS] [--selection-seeds 1]
        [--first-selection-seed 20]

Each choice is fine-tuned from the same factorized start with shuffling seeds first-seed ..
first-seed + finetune-seeds - 1, and the relaxation's per-seed difference from CPTV is printed
with its mean and standard error at the end. The relaxation's own selection fine-tunes each
candidate with seeds first-selection-seed .. first-selection-seed + selection-seeds - 1, never
one of those.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch

from deepshrink.data import load_data, make_loader
from deepshrink.lowrank import factorize, layer_spectra, select_cptv, select_pos
from deepshrink.lowrank.relaxed import PROJECTIONS, RelaxedOptions, Selection, candidate_key, select_relaxed
from deepshrink.references import reference_model
from deepshrink.train import TrainConfig, evaluate, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet-300-100", "lenet-5"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--finetune-seeds", type=int, default=5, help="fine-tune each choice this many times")
    parser.add_argument("--first-seed", type=int, default=3, help="the first fine-tuning seed (default 3)")
    parser.add_argument(
        "--selection-epochs",
        type=int,
        help="relaxed: fine-tune each candidate this many epochs and keep the highest validation accuracy "
        "(0: score on the training loss before fine-tuning; default: as many as --finetune-epochs)",
    )
    parser.add_argument(
        "--selection-seeds", type=int, default=1, help="relaxed: fine-tuning runs per candidate (default 1)"
    )
    parser.add_argument(
        "--first-selection-seed",
        type=int,
        default=20,
        help="relaxed: the first of the selection's shuffling seeds; they must not overlap the fine-tuning seeds",
    )
    parser.add_argument("--methods", nargs="+", default=["CPTV", "POS", "relaxed"], choices=["CPTV", "POS", "relaxed"])
    parser.add_argument("--projection", default="euclidean", choices=PROJECTIONS, help="relaxed: the descents' metric")
    parser.add_argument(
        "--baseline", help="an earlier run's JSON, for the CPTV rows of the differences when CPTV is not rerun"
    )
    parser.add_argument("--out", default="benchmarks/results/lowrank_table.json")
    args = parser.parse_args()
    if args.selection_epochs is None:
        args.selection_epochs = args.finetune_epochs
    data = load_data()
    test = make_loader(data.test, 1000, shuffle=False)
    validation = make_loader(data.validation, 1000, shuffle=False)
    results = []
    seeds = range(args.first_seed, args.first_seed + args.finetune_seeds)
    selection_seeds = range(args.first_selection_seed, args.first_selection_seed + args.selection_seeds)
    if set(seeds) & set(selection_seeds):
        parser.error(
            f"the selection's seeds {list(selection_seeds)} overlap the fine-tuning seeds {list(seeds)}: the "
            "selection would have seen the very runs it is judged by; move --first-selection-seed"
        )
    # A network (ranks and components) chosen by two methods is fine-tuned once: same start, same seeds.
    finetuned: dict[tuple, tuple[float, list[float]]] = {}
    for name in args.models:
        reference = reference_model(name, data, progress=False).model
        base = evaluate(reference, test).metric
        spectra = layer_spectra(reference, data.train.tensors[0][:2], "zhang")
        for budget in args.budgets:
            for method in args.methods:
                started = time.perf_counter()
                if method == "CPTV":
                    choice = select_cptv(spectra, budget)
                elif method == "POS":
                    choice = select_pos(spectra, budget)
                else:
                    loader = make_loader(data.train, 256, shuffle=True, seed=1)
                    selection = Selection()
                    if args.selection_epochs:
                        selection = Selection(
                            validation=validation,
                            finetune=TrainConfig(epochs=args.selection_epochs, learning_rate=0.01),
                            loaders=lambda seed: make_loader(data.train, 128, shuffle=True, seed=seed),
                            seeds=tuple(selection_seeds),
                        )
                    options = RelaxedOptions(steps=300, projection=args.projection, selection=selection)
                    choice = select_relaxed(reference, spectra, budget, loader, options)
                components = choice.components
                key = (name, candidate_key(choice.ranks, components))
                if key not in finetuned:
                    model = factorize(copy.deepcopy(reference), spectra, choice.ranks, components)
                    # Fine-tuning differences between methods are of the order of the test noise, so
                    # each choice is fine-tuned from the same factorized start with several shuffling
                    # seeds and the mean is compared.
                    afters = []
                    for seed in seeds:
                        tuned = copy.deepcopy(model)
                        fit(
                            tuned,
                            make_loader(data.train, 128, shuffle=True, seed=seed),
                            TrainConfig(epochs=args.finetune_epochs, learning_rate=0.01, seed=seed),
                            progress=False,
                        )
                        afters.append(evaluate(tuned, test).metric)
                    finetuned[key] = (evaluate(model, test).metric, afters)
                before, afters = finetuned[key]
                after = sum(afters) / len(afters)
                row = {
                    "model": name,
                    "budget": budget,
                    "method": method,
                    "ranks": choice.ranks,
                    "mac_fraction": choice.mac_fraction,
                    "reference_accuracy": base,
                    "accuracy_before_finetuning": before,
                    "accuracy_after_finetuning": after,
                    "accuracy_after_finetuning_per_seed": afters,
                    "finetune_seeds": list(seeds),
                    "relaxed_candidates": choice.candidates,
                    "relaxed_winner": choice.winner,
                    "relaxed_criterion": choice.criterion,
                    "relaxed_projection": args.projection if method == "relaxed" else None,
                    "relaxed_selection_seeds": list(selection_seeds) if method == "relaxed" else None,
                    "seconds": time.perf_counter() - started,
                }
                results.append(row)
                ranks = " ".join(f"{layer}={'dense' if rank is None else rank}" for layer, rank in choice.ranks.items())
                print(
                    f"{name} budget {budget:.1f} {method:8s} MACs {100 * choice.mac_fraction:5.1f}%  {ranks}  "
                    f"{100 * before:.2f}% -> {100 * after:.2f}% mean of "
                    f"{' '.join(f'{100 * value:.2f}' for value in afters)} (reference {100 * base:.2f}%)"
                    + (f" [winner: {choice.winner}]" if choice.winner else ""),
                    flush=True,
                )
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else []
    _print_differences(results, baseline)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


def _print_differences(results: list[dict], baseline: list[dict]) -> None:
    """Relaxed minus CPTV after fine-tuning, per budget: the per-seed differences, their mean and
    standard error (the seeds pair the two: same shuffling, same test images)."""
    by_key = {(row["model"], row["budget"], row["method"]): row for row in baseline if row["method"] == "CPTV"}
    by_key.update({(row["model"], row["budget"], row["method"]): row for row in results})
    print("relaxed - CPTV after fine-tuning, test points (per seed; mean +- standard error):")
    for (model, budget, method), row in by_key.items():
        if method != "relaxed" or (model, budget, "CPTV") not in by_key:
            continue
        if by_key[(model, budget, "CPTV")].get("finetune_seeds") != row["finetune_seeds"]:
            print(f"  {model} {budget:.1f}: the CPTV row was fine-tuned with other seeds; not compared")
            continue
        cptv = by_key[(model, budget, "CPTV")]["accuracy_after_finetuning_per_seed"]
        ours = row["accuracy_after_finetuning_per_seed"]
        differences = [100 * (mine - theirs) for mine, theirs in zip(ours, cptv, strict=True)]
        mean = statistics.fmean(differences)
        error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else float("nan")
        print(
            f"  {model} {budget:.1f}: {' '.join(f'{value:+.2f}' for value in differences)}; {mean:+.3f} +- {error:.3f}"
        )


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
