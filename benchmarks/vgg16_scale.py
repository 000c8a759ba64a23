"""A VGG-16-shaped model (138.4M weights, Laplace-distributed) through prune, share, save and
load, with the time of each step and, for loading, the peak memory of a fresh process over the
fp32 model's own size (issue 21).

    .venv/bin/python benchmarks/vgg16_scale.py [--repeats 3]

Pruning keeps 7.6% (the paper's VGG-16), sharing uses the paper's 8 bits for convolutions and
5 for the fully connected layers; the load runs in a new process per repeat, so its peak memory
is its own (the kernel's high-water mark, from just before `load_compressed`), less the
model's own fp32 bytes, as a fraction of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SPARSITY = 0.924


def vgg16() -> nn.Module:
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers, channels = [], 3
    for value in cfg:
        if value == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, value, 3, padding=1), nn.ReLU()]
            channels = value
    head = [nn.Linear(25088, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000)]
    return nn.Sequential(*layers, nn.Flatten(), *head)


# The peak is the kernel's high-water mark of this process's memory (VmHWM), which exec starts
# afresh; getrusage's ru_maxrss would carry over the parent's, which holds the whole model.
LOAD = """
import sys, time, torch
sys.path.insert(0, {here!r})
import deepshrink, vgg16_scale

def high_water():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

torch.set_num_threads(2)
before = high_water()
started = time.perf_counter()
model, _ = deepshrink.load_compressed({path!r}, "vgg16_scale:vgg16")
seconds = time.perf_counter() - started
peak = high_water() - before
print(seconds, peak, sum(parameter.numel() * 4 for parameter in model.parameters()))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import deepshrink
    from deepshrink.layers import compressible_weights
    from deepshrink.prune.masks import sparsity_mask
    from deepshrink.prune.module import apply_masks
    from deepshrink.quantize.shared import share_weights

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = vgg16()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.distributions.Laplace(0.0, 0.02).sample(parameter.shape))
    timings: dict[str, float | list[float]] = {}
    started = time.perf_counter()
    weights = compressible_weights(model)
    apply_masks(model, {name: sparsity_mask(weight.value, SPARSITY) for name, weight in weights.items()})
    timings["prune"] = time.perf_counter() - started
    started = time.perf_counter()
    share_weights(model, None)
    timings["share"] = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "vgg16.dcz"
        saves = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            deepshrink.save_compressed(model, path, model_name="vgg16_scale:vgg16")
            saves.append(time.perf_counter() - started)
        loads, peaks = [], []
        for _ in range(args.repeats):
            script = LOAD.format(here=str(HERE), path=str(path))
            output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
            seconds, peak, size = (float(value) for value in output.stdout.split())
            loads.append(seconds)
            peaks.append((peak - size) / size)
        row = {
            "weights": sum(weight.value.numel() for weight in weights.values()),
            "file_bytes": path.stat().st_size,
            "prune_seconds": timings["prune"],
            "share_seconds": timings["share"],
            "save_seconds": statistics.median(saves),
            "load_seconds": statistics.median(loads),
            "load_peak_over_model": statistics.median(peaks),
        }
    print(
        f"VGG-16 shape, {row['weights']:,} weights -> {row['file_bytes']:,} B: prune {row['prune_seconds']:.2f} s, "
        f"share {row['share_seconds']:.2f} s, save {row['save_seconds']:.2f} s, load {row['load_seconds']:.2f} s "
        f"(fresh process, peak {row['load_peak_over_model']:.2f}x the fp32 model over it)"
    )
    (HERE / "results" / "vgg16_scale.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
