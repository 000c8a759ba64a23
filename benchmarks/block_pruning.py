"""Issue 22 exploration: LeNet-300-100's fc1 pruned in 1 x B blocks of adjacent inputs (or, with
`--along outputs`, B x 1 blocks of adjacent units reading one input, coded in CSC), so that
more weights fit in the same bytes (the gaps inside a block are 0, which the adaptive ANS coder
codes in a fraction of a bit), against unstructured magnitude pruning at fewer weights.

Iterative magnitude pruning from the cached reference (Fashion-MNIST): `rounds` rounds, the kept
fraction shrinking geometrically to fc1's count (fc2 6%, fc3 30%, unstructured), each round
retrained `epochs` epochs by SGD (momentum 0.9, learning rate 0.05 cosine, weight decay 5e-4)
against half the labels and half the reference's soft targets at temperature 4, as
`recipes/lenet-300-100-80x.yaml` retrains. A block's score is the L2 norm of its weights. Then
fc1 is shared at 4 bits (linear initialisation, no fine-tuning) and encoded as that recipe
encodes it (CSR, 8-bit gaps, ANS): its bytes, and the validation and test accuracy before
sharing.

    .venv/bin/python benchmarks/block_pruning.py BLOCK FC1_WEIGHTS SEED [--rounds 8] [--epochs 8] [--along outputs]

Prints one line a round and a RESULT line (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F  # noqa: N812
from masked_finetune import accuracy  # benchmarks/: the validation and test accuracy the explorations share
from torch import nn

from deepshrink import load_data, make_loader
from deepshrink.encode.codec import encode_model
from deepshrink.models import build_model
from deepshrink.prune.module import apply_masks
from deepshrink.quantize.shared import share_weights
from deepshrink.references import reference_model

TEMPERATURE, ALPHA, LEARNING_RATE = 4.0, 0.5, 0.05


def block_mask(weight: torch.Tensor, mask: torch.Tensor, keep: int, block: int, along: str = "inputs") -> torch.Tensor:
    """The `keep` // `block` blocks of `block` adjacent columns (inputs) or rows (outputs) with
    the largest L2 norm."""
    if along == "outputs":
        return block_mask(weight.T, mask.T, keep, block).T
    scores = (weight * mask).reshape(weight.shape[0], -1, block).pow(2).sum(-1)
    chosen = torch.zeros(scores.numel(), dtype=torch.bool)
    chosen[torch.topk(scores.flatten(), keep // block).indices] = True
    return chosen.reshape(scores.shape).repeat_interleave(block, dim=1)


def fc1_bytes(weight: torch.Tensor, layout: str = "csr") -> int:
    """fc1's streams and codebook, shared at 4 bits and encoded as the 80x recipe encodes it
    (blocks along the outputs in CSC, where their inner gaps are 0)."""
    layer = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        layer[0].weight.copy_(weight)
    apply_masks(layer, {"0": weight != 0})
    share_weights(layer, {"0": 4})
    header, buffers = encode_model(layer, index_bits={"0": 8}, coder="ans", layout=layout)
    record = header["tensors"][0]
    return sum(len(buffers[stream["buffer"]]) for stream in record["streams"].values()) + len(
        buffers[record["codebook"]]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("block", type=int)
    parser.add_argument("fc1_weights", type=int)
    parser.add_argument("seed", type=int)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--along", choices=("inputs", "outputs"), default="inputs", help="what a block's weights share")
    arguments = parser.parse_args()
    torch.manual_seed(arguments.seed)
    data = load_data()
    teacher = reference_model("lenet-300-100", data, progress=False).model.eval()
    model = build_model("lenet-300-100")
    model.load_state_dict(teacher.state_dict())
    targets = {"fc1": arguments.fc1_weights, "fc2": 1800, "fc3": 300}
    layers = {name: getattr(model, name) for name in targets}
    masks = {name: torch.ones_like(layer.weight, dtype=torch.bool) for name, layer in layers.items()}
    train = make_loader(data.train, 128, shuffle=True, seed=arguments.seed)
    validation = make_loader(data.validation, 1000, shuffle=False)
    test = make_loader(data.test, 1000, shuffle=False)
    started = time.time()
    for round_number in range(1, arguments.rounds + 1):
        with torch.no_grad():
            for name, layer in layers.items():
                total = layer.weight.numel()
                keep = round(total * (targets[name] / total) ** (round_number / arguments.rounds))
                block = arguments.block if name == "fc1" else 1
                along = arguments.along if name == "fc1" else "inputs"
                masks[name] = block_mask(layer.weight, masks[name], keep, block, along)
                layer.weight.mul_(masks[name])
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9, weight_decay=5e-4)
        steps = arguments.epochs * len(train)
        for step in range(steps):
            if step % len(train) == 0:
                batches = iter(train)
            inputs, labels = next(batches)
            for group in optimizer.param_groups:
                group["lr"] = LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * step / steps))
            optimizer.zero_grad()
            outputs = model(inputs)
            with torch.no_grad():
                soft = F.softmax(teacher(inputs) / TEMPERATURE, 1)
            distilled = F.kl_div(F.log_softmax(outputs / TEMPERATURE, 1), soft, reduction="batchmean")
            loss = (1 - ALPHA) * F.cross_entropy(outputs, labels) + ALPHA * TEMPERATURE**2 * distilled
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for name, layer in layers.items():
                    layer.weight.mul_(masks[name])
        kept = [int(mask.sum()) for mask in masks.values()]
        score = accuracy(model, validation)
        print(f"round {round_number}: kept {kept}, validation {score:.4f} ({time.time() - started:.0f} s)")
    result = {
        "block": arguments.block,
        "fc1_weights": arguments.fc1_weights,
        "seed": arguments.seed,
        "along": arguments.along,
        "fc1_bytes": fc1_bytes(model.fc1.weight.detach(), "csc" if arguments.along == "outputs" else "csr"),
        "fc1_units_unread": int((~masks["fc1"].any(1)).sum()),
        "validation": accuracy(model, validation),
        "test": accuracy(model, test),
    }
    print("RESULT", json.dumps(result))


if __name__ == "__main__":
    main()
