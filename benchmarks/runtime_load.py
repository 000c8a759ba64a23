"""How long `load_runtime` takes in auto mode on a file with BERT-base's weight matrices, with
layers alike measured once (as it ships) against every layer measured (as before), interleaved.

The model is BERT-base's encoder as plain Linear layers, in its shapes and numbers: twelve
blocks of four 768 x 768 projections, a 3,072 x 768 and a 768 x 3,072 (72 matrices, 85M
weights; a transformers BertModel runs its own attention around the same nn.Linear layers).
Every matrix is pruned to 10% by magnitude and shared at 4 bits, then saved.

    .venv/bin/python benchmarks/runtime_load.py [--repeats 3]

Prints the machine, then each load's seconds, the medians and their ratio, and which product
each batch range of the layers runs (the choices must agree between the two ways).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from deepshrink.compressed import save_compressed
from deepshrink.prune.masks import sparsity_mask
from deepshrink.prune.module import apply_masks
from deepshrink.quantize.shared import share_weights
from deepshrink.runtime import load as runtime_load
from deepshrink.runtime.bench import machine_description
from deepshrink.runtime.load import load_runtime
from deepshrink.runtime.modules import CompressedLinear

WIDTH, INTERMEDIATE, BLOCKS = 768, 3072, 12


def encoder() -> nn.Sequential:
    shapes = [(WIDTH, WIDTH)] * 4 + [(WIDTH, INTERMEDIATE), (INTERMEDIATE, WIDTH)]
    return nn.Sequential(*(nn.Linear(inputs, outputs) for _ in range(BLOCKS) for inputs, outputs in shapes))


def plans(model: nn.Module) -> collections.Counter:
    return collections.Counter(
        module.choice.plans if isinstance(module, CompressedLinear) else ("dense",) * 3 for module in model
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    print(machine_description())
    torch.manual_seed(0)
    model = encoder()
    layers = dict(model.named_modules())
    names = [name for name, module in layers.items() if isinstance(module, nn.Linear)]
    apply_masks(model, {name: sparsity_mask(layers[name].weight, 0.9) for name in names})
    share_weights(model, {"*": 4})
    path = save_compressed(model, Path(tempfile.mkdtemp()) / "encoder.dcz", model_name="encoder")
    weights = sum(layers[name].weight.numel() for name in names)
    print(f"{len(names)} matrices, {weights:,} weights; the file {path.stat().st_size:,} bytes")
    original_key = runtime_load.measurement_key
    unique = itertools.count()
    seconds: dict[str, list[float]] = {"alike measured once": [], "every layer measured": []}
    choices = {}
    for _ in range(arguments.repeats):
        for way in seconds:  # interleaved: a noisy neighbour slows both ways alike
            runtime_load.measurement_key = original_key if way == "alike measured once" else lambda *_: next(unique)
            started = time.perf_counter()
            running = load_runtime(path, encoder())
            seconds[way].append(time.perf_counter() - started)
            choices[way] = plans(running)
            print(f"{way}: {seconds[way][-1]:.1f} s")
    runtime_load.measurement_key = original_key
    once, every = (statistics.median(values) for values in seconds.values())
    print(f"median: {once:.1f} s alike measured once, {every:.1f} s every layer measured: {every / once:.1f}x faster")
    for way, counted in choices.items():
        print(f"{way}: plans (batch 1, up to 16, larger) {dict(counted)}")


if __name__ == "__main__":
    main()
