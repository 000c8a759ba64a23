"""How long `load_runtime` takes in auto mode, as it ships against the way it measured before
(every layer measured, every kind timed in rounds at batch 64), interleaved, on two files:

- `bert-base`: BERT-base's encoder as plain Linear layers, in its shapes and numbers: twelve
  blocks of four 768 x 768 projections, a 3,072 x 768 and a 768 x 3,072 (72 matrices, 85M
  weights; a transformers BertModel runs its own attention around the same nn.Linear layers).
  Every matrix pruned to 10% by magnitude, shared at 4 bits. What ships measures layers alike
  (same shape, form and density to 1%) once.
- `resnet-18`: torchvision's ResNet-18 layout (11.7M weights, 20 convolutions and the
  classifier), every weight pruned to 20% by magnitude and shared at 5 bits, loaded with
  `input_shape=(3, 224, 224)` so that its convolutions are timed too. What ships also stops
  timing a kind whose one sizing call took more than DECISIVE times the fastest's (where calls
  are LONG_CALL_SECONDS or more) and times the large-batch range on fewer examples of a large
  input (`representative_batch`).

    .venv/bin/python benchmarks/runtime_load.py [--model bert-base|resnet-18] [--repeats 3]

Prints the machine, then each load's seconds, the medians and their ratio, and which product
each batch range of the layers runs under each way.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from deepshrink.compressed import save_compressed
from deepshrink.layers import compressible_weights
from deepshrink.prune.masks import sparsity_mask
from deepshrink.prune.module import apply_masks
from deepshrink.quantize.shared import share_weights
from deepshrink.runtime import choice as runtime_choice
from deepshrink.runtime import load as runtime_load
from deepshrink.runtime.bench import machine_description
from deepshrink.runtime.load import load_runtime
from deepshrink.runtime.modules import CompressedConv2d, CompressedLinear

WIDTH, INTERMEDIATE, BLOCKS = 768, 3072, 12


def encoder() -> nn.Sequential:
    shapes = [(WIDTH, WIDTH)] * 4 + [(WIDTH, INTERMEDIATE), (INTERMEDIATE, WIDTH)]
    return nn.Sequential(*(nn.Linear(inputs, outputs) for _ in range(BLOCKS) for inputs, outputs in shapes))


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        identity = inputs if self.downsample is None else self.downsample(inputs)
        hidden = torch.relu(self.bn1(self.conv1(inputs)))
        return torch.relu(self.bn2(self.conv2(hidden)) + identity)


def resnet18() -> nn.Module:
    """torchvision's resnet18, its layout and names, for 224 x 224 images and 1,000 classes."""
    stages = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        *(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)) for cin, cout, stride in stages),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, 1000),
    )


MODELS = {
    "bert-base": (encoder, 0.9, 4, None),
    "resnet-18": (resnet18, 0.8, 5, (3, 224, 224)),
}


def plans(model: nn.Module) -> collections.Counter:
    return collections.Counter(
        module.choice.plans for module in model.modules() if isinstance(module, CompressedLinear | CompressedConv2d)
    )


@contextlib.contextmanager
def measured_as_before():
    """The measuring rules before 2026-12-04: every layer its own measurement, every kind timed
    in rounds after three warm-up calls, the large-batch range at 64 examples."""
    unique = itertools.count()
    saved = (runtime_load.measurement_key, runtime_choice.LONG_CALL_SECONDS, runtime_choice.LARGE_BATCH_ELEMENTS)
    runtime_load.measurement_key = lambda *_: next(unique)
    runtime_choice.LONG_CALL_SECONDS = float("inf")
    runtime_choice.LARGE_BATCH_ELEMENTS = 1 << 62
    try:
        yield
    finally:
        runtime_load.measurement_key, runtime_choice.LONG_CALL_SECONDS, runtime_choice.LARGE_BATCH_ELEMENTS = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="bert-base")
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    print(machine_description())
    factory, sparsity, bits, input_shape = MODELS[arguments.model]
    torch.manual_seed(0)
    model = factory()
    weights = compressible_weights(model)
    apply_masks(model, {name: sparsity_mask(weight.value, sparsity) for name, weight in weights.items()})
    share_weights(model, {"*": bits})
    path = save_compressed(model, Path(tempfile.mkdtemp()) / "model.dcz", model_name=arguments.model)
    count = sum(weight.value.numel() for weight in weights.values())
    print(f"{arguments.model}: {len(weights)} weights, {count:,} values; the file {path.stat().st_size:,} bytes")
    seconds: dict[str, list[float]] = {"as shipped": [], "as before": []}
    choices = {}
    for _ in range(arguments.repeats):
        for way in seconds:  # interleaved: a noisy neighbour slows both ways alike
            with measured_as_before() if way == "as before" else contextlib.nullcontext():
                started = time.perf_counter()
                running = load_runtime(path, factory(), input_shape=input_shape)
                seconds[way].append(time.perf_counter() - started)
            choices[way] = plans(running)
            print(f"{way}: {seconds[way][-1]:.1f} s")
    shipped, before = (statistics.median(values) for values in seconds.values())
    print(f"median: {shipped:.1f} s as shipped, {before:.1f} s as before: {before / shipped:.1f}x faster")
    for way, counted in choices.items():
        print(f"{way}: compressed layers' plans (batch 1, up to 16, larger) {dict(counted)}")


if __name__ == "__main__":
    main()
