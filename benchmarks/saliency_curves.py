"""OBD and OBS against magnitude pruning at equal sparsities, without retraining.

1. Whole LeNet-300-100, one global threshold: magnitude |w| against OBD's h_kk w_k^2 / 2, with
   h_kk the Gauss-Newton (Fisher) diagonal estimated on 10,000 training images.
2. fc3 alone (1,000 weights): magnitude, OBD with the exact diagonal of fc3's Hessian, and OBS
   with the exact inverse Hessian and its compensating update.

Accuracy is on the validation split (the test set is not needed to compare curves).

    .venv/bin/python benchmarks/saliency_curves.py
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from deepshrink.data import load_data, make_loader
from deepshrink.prune.masks import global_sparsity_masks, mask_from_scores, sparsity_mask
from deepshrink.prune.saliency import fisher_diagonal, obd_saliency, optimal_brain_surgeon, softmax_layer_hessian
from deepshrink.references import reference_model
from deepshrink.train import evaluate

GLOBAL_SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97)
FC3_SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95)


def accuracy_with(model, masks_or_weights, loader, replace=False):
    trial = copy.deepcopy(model)
    with torch.no_grad():
        for name, value in masks_or_weights.items():
            weight = getattr(trial, name).weight
            weight.copy_(value if replace else weight * value)
    return evaluate(trial, loader).metric


def main() -> None:
    data = load_data()
    model = reference_model("lenet-300-100", data, progress=False).model.eval()
    validation = make_loader(data.validation, 1000, shuffle=False)
    train = make_loader(data.train, 1000, shuffle=True, seed=1)
    names = ["fc1", "fc2", "fc3"]
    weights = {name: getattr(model, name).weight.detach() for name in names}

    fisher = fisher_diagonal(model, train, names, max_examples=10_000)
    obd = {name: obd_saliency(weights[name], fisher[name]) for name in names}
    whole = {"sparsity": list(GLOBAL_SPARSITIES), "magnitude": [], "obd": []}
    for sparsity in GLOBAL_SPARSITIES:
        whole["magnitude"].append(accuracy_with(model, global_sparsity_masks(weights, sparsity), validation))
        flat = torch.cat([obd[name].flatten() for name in names])
        keep = mask_from_scores(flat, sparsity)
        masks, offset = {}, 0
        for name in names:
            masks[name] = keep[offset : offset + weights[name].numel()].view_as(weights[name])
            offset += weights[name].numel()
        whole["obd"].append(accuracy_with(model, masks, validation))

    # fc3's exact Hessian from 10,000 training images: its inputs are fc2's activations.
    images = data.train.tensors[0][:10_000]
    with torch.no_grad():
        features = torch.relu(model.fc2(torch.relu(model.fc1(images.flatten(1)))))
        probabilities = torch.softmax(model.fc3(features), dim=1)
    hessian = softmax_layer_hessian(features, probabilities, damping=1e-4)
    inverse = torch.linalg.inv(hessian)
    fc3 = weights["fc3"]
    exact_obd = obd_saliency(fc3, hessian.diagonal().view_as(fc3).float())
    layer = {"sparsity": list(FC3_SPARSITIES), "magnitude": [], "obd": [], "obs": []}
    for sparsity in FC3_SPARSITIES:
        layer["magnitude"].append(accuracy_with(model, {"fc3": sparsity_mask(fc3, sparsity)}, validation))
        layer["obd"].append(accuracy_with(model, {"fc3": mask_from_scores(exact_obd, sparsity)}, validation))
        surgeon = optimal_brain_surgeon(fc3, inverse, round(sparsity * fc3.numel()))
        layer["obs"].append(accuracy_with(model, {"fc3": surgeon.weight}, validation, replace=True))

    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "saliency_curves.json").write_text(json.dumps({"whole_network": whole, "fc3": layer}, indent=2))
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for key, label in (("magnitude", "magnitude |w|"), ("obd", "OBD h w^2/2 (Fisher diagonal)")):
        left.plot([100 * s for s in whole["sparsity"]], [100 * a for a in whole[key]], marker="o", label=label)
    left.set_title("LeNet-300-100, global threshold, no retraining")
    for key, label in (("magnitude", "magnitude"), ("obd", "OBD (exact diagonal)"), ("obs", "OBS (+ compensation)")):
        right.plot([100 * s for s in layer["sparsity"]], [100 * a for a in layer[key]], marker="o", label=label)
    right.set_title("fc3 alone, exact Hessian, no retraining")
    for axes in (left, right):
        axes.set_xlabel("weights pruned (%)")
        axes.set_ylabel("validation accuracy (%)")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(out / "saliency_curves.png")

    print("| sparsity | magnitude | OBD |")
    print("| ---: | ---: | ---: |")
    for index, sparsity in enumerate(whole["sparsity"]):
        print(f"| {100 * sparsity:.0f}% | {100 * whole['magnitude'][index]:.2f}% | {100 * whole['obd'][index]:.2f}% |")
    print("\n| fc3 sparsity | magnitude | OBD | OBS |")
    print("| ---: | ---: | ---: | ---: |")
    for index, sparsity in enumerate(layer["sparsity"]):
        print(
            f"| {100 * sparsity:.0f}% | {100 * layer['magnitude'][index]:.2f}% | {100 * layer['obd'][index]:.2f}% "
            f"| {100 * layer['obs'][index]:.2f}% |"
        )


if __name__ == "__main__":
    main()
