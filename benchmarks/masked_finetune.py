"""Issue 22 exploration: can retraining a sparse LeNet-300-100 win back the validation accuracy
that variational dropout's masks lose? Validation split only (the test split is for rule runs).

From a pruned stage of `recipes/lenet-300-100-variational.yaml` (its prune stage's checkpoint:
variational dropout, then 25 epochs with the masks fixed), one retraining of LeNet-300-100 with
SGD (momentum 0.9, cosine schedule unless `constant`), per JSON settings:

- nothing else: more epochs with the masks fixed (the control);
- `alpha`, `every`, `stop`: the masks move as in RigL (Evci et al., 2020): every `every` steps
  until `stop` of the run, each layer drops a fraction (from `alpha`, cosine-decayed) of its
  smallest kept weights and grows as many where the dense gradient is largest, its count fixed;
- `rewind`: the kept weights (and every bias) set back to the reference's trained values
  before retraining, so that variational dropout only chooses the mask;
- `gmp`: start from the reference instead and prune by magnitude gradually (Zhu & Gupta's cubic
  schedule over that fraction of the run) to the stage's per-layer counts times `scale`;
- `wd`, `lr`, `epochs`, `smooth` (label smoothing), `shift` (inputs rolled by up to that many
  pixels), `swa_from` (weights averaged once an epoch from that epoch on).

    .venv/bin/python benchmarks/masked_finetune.py '{"alpha": 0.3}' RUN_DIR/stages/prune-KEY.safetensors

Prints the validation accuracy as it goes and one RESULT line: validation and training
accuracy, weights moved, units left with no inputs, weights kept per layer.
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch
from safetensors.torch import load_file

from deepshrink import load_data, make_loader
from deepshrink.models import build_model
from deepshrink.references import reference_model

LAYERS = ("fc1", "fc2", "fc3")


def accuracy(model: torch.nn.Module, loader) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for inputs, targets in loader:
            right += (model(inputs).argmax(1) == targets).sum().item()
            total += len(targets)
    model.train()
    return right / total


def pruned_model(stage: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """LeNet-300-100 with a prune stage's masked weights, and its masks."""
    state = load_file(stage)
    model = build_model("lenet-300-100")
    masks = {}
    with torch.no_grad():
        for name in LAYERS:
            layer = getattr(model, name)
            mask = state[f"{name}.parametrizations.weight.0.mask"].bool()
            layer.weight.copy_(state[f"{name}.parametrizations.weight.original"] * mask)
            layer.bias.copy_(state[f"{name}.bias"])
            masks[name] = mask.clone()
    return model, masks


def move_masks(model, masks, optimizer, fraction: float) -> int:
    """RigL's update: per layer, drop `fraction` of the kept weights with the smallest
    magnitude and grow as many where the gradient is largest; returns the weights moved."""
    moved = 0
    with torch.no_grad():
        for name, mask in masks.items():
            weight = getattr(model, name).weight
            count = int(fraction * int(mask.sum()))
            if count == 0:
                continue
            smallest = torch.where(mask, weight.abs(), torch.full_like(weight, float("inf")))
            drop = torch.topk(smallest.flatten(), count, largest=False).indices
            growth = torch.where(mask, torch.full_like(weight, -1.0), weight.grad.abs())
            growth.view(-1)[drop] = -1.0  # a weight just dropped is not grown again at once
            grow = torch.topk(growth.flatten(), count).indices
            mask.view(-1)[drop] = False
            mask.view(-1)[grow] = True
            weight.view(-1)[drop] = 0.0
            weight.view(-1)[grow] = 0.0
            momentum = optimizer.state.get(weight, {}).get("momentum_buffer")
            if momentum is not None:
                momentum.view(-1)[drop] = 0.0
                momentum.view(-1)[grow] = 0.0
            moved += count
    return moved


def prune_gradually(model, masks, targets: dict[str, int], progress: float) -> None:
    """Magnitude pruning on Zhu & Gupta's cubic schedule, `progress` from 0 to 1."""
    with torch.no_grad():
        for name, mask in masks.items():
            weight = getattr(model, name).weight
            target = int(targets[name] + (mask.numel() - targets[name]) * (1 - progress) ** 3)
            if int(mask.sum()) > target:
                kept = torch.where(mask, weight.abs(), torch.full_like(weight, -1.0))
                keep = torch.topk(kept.flatten(), target).indices
                mask.zero_()
                mask.view(-1)[keep] = True
                weight.mul_(mask)


def main() -> None:
    settings = json.loads(sys.argv[1])
    torch.manual_seed(settings.get("seed", 0))
    data = load_data()
    model, masks = pruned_model(sys.argv[2])
    targets = {name: int(int(mask.sum()) * settings.get("scale", 1.0)) for name, mask in masks.items()}
    if settings.get("gmp") or settings.get("rewind"):
        model.load_state_dict(reference_model("lenet-300-100", data, progress=False).model.state_dict())
    if settings.get("gmp"):
        masks = {name: torch.ones_like(mask) for name, mask in masks.items()}
    elif settings.get("rewind"):
        with torch.no_grad():
            for name in LAYERS:
                getattr(model, name).weight.mul_(masks[name])
    validation = make_loader(data.validation, 1000, shuffle=False)
    train = make_loader(data.train, 128, shuffle=True, seed=settings.get("seed", 0))
    print("start: validation", accuracy(model, validation), flush=True)

    epochs = settings.get("epochs", 25)
    steps = epochs * len(train)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.get("lr", 0.01), momentum=0.9, weight_decay=settings.get("wd", 5e-4)
    )
    cosine = (lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))) if not settings.get("constant") else None
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine or (lambda step: 1.0))
    loss_function = torch.nn.CrossEntropyLoss(label_smoothing=settings.get("smooth", 0.0))
    alpha, every = settings.get("alpha", 0.0), settings.get("every", 100)
    stop = settings.get("stop", 0.75) * steps
    shift, average_from = settings.get("shift", 0), settings.get("swa_from")
    average, averaged, moved, step, started = None, 0, 0, 0, time.time()
    for epoch in range(epochs):
        for inputs, labels in train:
            optimizer.zero_grad()
            if shift:
                rows, columns = (int(value) for value in torch.randint(-shift, shift + 1, (2,)))
                inputs = torch.roll(inputs, shifts=(rows, columns), dims=(-2, -1))
            loss_function(model(inputs), labels).backward()
            if settings.get("gmp") and step % every == 0 and step <= settings["gmp"] * steps:
                prune_gradually(model, masks, targets, min(1.0, step / (settings["gmp"] * steps)))
            if alpha and step % every == 0 and 0 < step < stop:
                moved += move_masks(model, masks, optimizer, alpha / 2 * (1 + math.cos(math.pi * step / stop)))
            for name in LAYERS:
                getattr(model, name).weight.grad.mul_(masks[name])
            optimizer.step()
            schedule.step()
            step += 1
            with torch.no_grad():
                for name in LAYERS:
                    getattr(model, name).weight.mul_(masks[name])
        if average_from is not None and epoch >= average_from:
            current = {key: value.clone() for key, value in model.state_dict().items()}
            if average is None:
                average = current
            else:
                for key in average:
                    average[key] += (current[key] - average[key]) / (averaged + 1)
            averaged += 1
        if epoch % 5 == 4 or epoch == epochs - 1:
            print(f"epoch {epoch + 1}: validation {accuracy(model, validation):.4f} ({time.time() - started:.0f} s)")
    if average is not None:
        model.load_state_dict(average)
    unfed = {name: int((masks[name].sum(1) == 0).sum()) for name in ("fc1", "fc2")}
    training = accuracy(model, make_loader(data.train, 1000, shuffle=False))
    kept = {name: int(mask.sum()) for name, mask in masks.items()}
    print(
        "RESULT",
        json.dumps(settings),
        f"validation {accuracy(model, validation):.4f} training {training:.4f} moved {moved}",
        f"units without inputs {unfed} kept {kept}",
        flush=True,
    )


if __name__ == "__main__":
    main()
