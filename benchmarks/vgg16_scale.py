"""A VGG-16-shaped model (138.4M weights, Laplace-distributed) through prune, share, save and
load, with the time of each step and, for loading, the peak memory of a fresh process over the
fp32 model's own size (issue 21); beside each step, in the same run, its anchor:

- prune: each layer's threshold by `np.partition` (benchmarks/mask_selection.py);
- share: each layer's k-means by the independent numba Lloyd (benchmarks/kmeans_speed.py), on
  the same kept weights into the same number of clusters;
- save + load: zstd level 1 (the `zstandard` package) compressing and decompressing every
  shared layer's codes, as a dense uint8/uint16 array, which is the entropy coding alone.

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
sys.path.insert(0, str(HERE))
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


def prune_anchor(weights) -> float:
    """Seconds for every layer's threshold by np.partition (the anchor of masks by selection)."""
    from mask_selection import partition_anchor

    started = time.perf_counter()
    for weight in weights.values():
        partition_anchor(weight.value.detach(), SPARSITY)
    return time.perf_counter() - started


def share_anchor(weights) -> float:
    """Seconds for the independent numba Lloyd on every layer's kept weights, into as many
    clusters as sharing makes (the paper's 8 bits conv / 5 fc, less the zero code), sort included."""
    import numpy as np
    from kmeans_speed import anchor_kmeans

    from deepshrink.layers import paper_default_bits

    anchor_kmeans(np.linspace(-1, 1, 10_000, dtype=np.float32), 31)  # compile outside the timing
    total = 0.0
    for weight in weights.values():
        values = weight.value.detach().numpy().ravel()
        kept = values[values != 0]
        seconds, _ = anchor_kmeans(kept, 2 ** paper_default_bits(weight) - 1)
        total += seconds
    return total


def codes_anchor(weights) -> float:
    """Seconds for zstd level 1 to compress and decompress every shared layer's dense codes."""
    import zstandard

    from deepshrink.quantize.shared import sharing_of

    compressor, decompressor = zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor()
    total = 0.0
    for weight in weights.values():
        codes = sharing_of(weight).indices.numpy().tobytes()
        started = time.perf_counter()
        decompressor.decompress(compressor.compress(codes), max_output_size=len(codes))
        total += time.perf_counter() - started
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import deepshrink
    from deepshrink.layers import compressible_weights
    from deepshrink.prune.masks import sparsity_mask
    from deepshrink.prune.module import apply_masks
    from deepshrink.quantize.shared import share_weights
    from deepshrink.runtime.bench import machine_description

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = vgg16()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.distributions.Laplace(0.0, 0.02).sample(parameter.shape))
    timings: dict[str, float | list[float]] = {}
    weights = compressible_weights(model)
    timings["prune_anchor"] = prune_anchor(weights)
    started = time.perf_counter()
    apply_masks(model, {name: sparsity_mask(weight.value, SPARSITY) for name, weight in weights.items()})
    timings["prune"] = time.perf_counter() - started
    timings["share_anchor"] = share_anchor(weights)
    started = time.perf_counter()
    share_weights(model, None)
    timings["share"] = time.perf_counter() - started
    timings["codes_anchor"] = codes_anchor(weights)
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
            "prune_anchor_seconds": timings["prune_anchor"],
            "share_seconds": timings["share"],
            "share_anchor_seconds": timings["share_anchor"],
            "save_seconds": statistics.median(saves),
            "load_seconds": statistics.median(loads),
            "codes_zstd1_encode_decode_seconds": timings["codes_anchor"],
            "load_peak_over_model": statistics.median(peaks),
            "machine": machine_description(),
        }
    print(
        f"VGG-16 shape, {row['weights']:,} weights -> {row['file_bytes']:,} B\n"
        f"  prune {row['prune_seconds']:.2f} s (anchor np.partition {row['prune_anchor_seconds']:.2f} s)\n"
        f"  share {row['share_seconds']:.2f} s (anchor numba Lloyd {row['share_anchor_seconds']:.2f} s)\n"
        f"  save {row['save_seconds']:.2f} s + load {row['load_seconds']:.2f} s = "
        f"{row['save_seconds'] + row['load_seconds']:.2f} s (anchor zstd-1 of the codes, both ways: "
        f"{row['codes_zstd1_encode_decode_seconds']:.2f} s); load peak {row['load_peak_over_model']:.2f}x "
        "the fp32 model over it (fresh process)"
    )
    (HERE / "results" / "vgg16_scale.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
