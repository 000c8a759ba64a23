"""How finely a fixed set of images can compare two fine-tuned low-rank networks.

CPTV's and POS's choices for a budget are factorized and fine-tuned as in lowrank_table.py (2
epochs, lr 0.01, one shuffling seed), and each network's per-image correctness is compared on
the validation and test splits. The paired (McNemar) sampling error of the accuracy difference
is sqrt((b + c) / n - d^2) / sqrt(n), where b and c count the images only one network gets
right and d = (c - b) / n. Averaging over fine-tuning seeds does not shrink it: every seed is
scored on the same images.

    .venv/bin/python benchmarks/lowrank_sampling_error.py [--models lenet-300-100 lenet-5]
        [--budgets 0.5 0.6 0.7] [--seed 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch

from deepshrink.data import load_data, make_loader
from deepshrink.lowrank import factorize, layer_spectra, select_cptv, select_pos
from deepshrink.references import reference_model
from deepshrink.train import TrainConfig, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet-300-100", "lenet-5"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    parser.add_argument("--seed", type=int, default=8, help="the fine-tuning shuffle (default 8)")
    parser.add_argument("--out", default="benchmarks/results/lowrank_sampling_error.json")
    args = parser.parse_args()
    data = load_data()
    results = []
    for name in args.models:
        reference = reference_model(name, data, progress=False).model
        spectra = layer_spectra(reference, data.train.tensors[0][:2], "zhang")
        for budget in args.budgets:
            correct = {}
            for method, choice in (("CPTV", select_cptv(spectra, budget)), ("POS", select_pos(spectra, budget))):
                model = factorize(copy.deepcopy(reference), spectra, choice.ranks)
                loader = make_loader(data.train, 128, shuffle=True, seed=args.seed)
                fit(model, loader, TrainConfig(epochs=2, learning_rate=0.01), progress=False)
                model.eval()
                for split, dataset in (("validation", data.validation), ("test", data.test)):
                    images, labels = dataset.tensors
                    with torch.no_grad():
                        correct[method, split] = model(images).argmax(1) == labels
            for split in ("validation", "test"):
                cptv, pos = correct["CPTV", split], correct["POS", split]
                count = len(cptv)
                only_cptv, only_pos = int((cptv & ~pos).sum()), int((pos & ~cptv).sum())
                difference = (only_pos - only_cptv) / count
                error = math.sqrt(((only_cptv + only_pos) / count - difference**2) / count)
                row = {
                    "model": name,
                    "budget": budget,
                    "seed": args.seed,
                    "split": split,
                    "images": count,
                    "cptv_accuracy": float(cptv.float().mean()),
                    "pos_accuracy": float(pos.float().mean()),
                    "only_cptv_right": only_cptv,
                    "only_pos_right": only_pos,
                    "pos_minus_cptv": difference,
                    "sampling_error": error,
                }
                results.append(row)
                print(
                    f"{name} {budget:.1f} {split:10s} {count} images: CPTV {100 * row['cptv_accuracy']:.2f}% "
                    f"POS {100 * row['pos_accuracy']:.2f}%; only CPTV right {only_cptv}, only POS right {only_pos} "
                    f"({100 * (only_cptv + only_pos) / count:.2f}% disagree); POS - CPTV {100 * difference:+.2f} "
                    f"+- {100 * error:.2f} points",
                    flush=True,
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
