"""Convolutions from the compressed form (im2col + the codebook product) against dense torch.

Single Conv2d layers with magnitude masks at several densities, 5-bit weight sharing, written
to a .dcz file and loaded twice: decoded to a dense nn.Conv2d, and with mode="sparse". Batch 1,
interleaved rounds, median. This is the measurement behind auto mode running convolutions
dense (runtime/load.py).

    .venv/bin/python benchmarks/conv_speed.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn

from deepshrink.compressed import read_state_dict, save_compressed
from deepshrink.prune.masks import sparsity_mask
from deepshrink.prune.module import apply_masks
from deepshrink.quantize.shared import share_weights
from deepshrink.runtime.bench import median_seconds
from deepshrink.runtime.load import load_runtime

# (in channels, out channels, kernel, input height and width): LeNet-5's conv2, a mid-sized
# layer, deep layers with few positions (VGG-16's last block has 512 channels on 14x14).
SHAPES = [(20, 50, 5, 12), (64, 128, 3, 14), (256, 256, 3, 7), (256, 256, 3, 14), (512, 512, 3, 14)]
DENSITIES = [0.1, 0.3]


def measure(shape: tuple[int, int, int, int], density: float, repeats: int, folder: Path) -> dict:
    in_channels, out_channels, kernel, size = shape
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel))
    apply_masks(model, {"0": sparsity_mask(model[0].weight, 1 - density)})
    share_weights(model, {"*": 5})
    path = save_compressed(model, folder / "conv.dcz", model_name="conv")
    dense = nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel))
    dense.load_state_dict(read_state_dict(path)[0])
    sparse = load_runtime(path, nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel)), mode="sparse")
    inputs = torch.randn(1, in_channels, size, size)
    times = {"dense": [], "compressed": []}
    with torch.no_grad():
        torch.testing.assert_close(sparse(inputs), dense.eval()(inputs), rtol=1e-5, atol=1e-5)
        for _ in range(5):
            for label, network in (("dense", dense), ("compressed", sparse)):
                times[label].append(median_seconds(functools.partial(network, inputs), repeats // 5, warmup=5))
    dense_us, compressed_us = (1e6 * statistics.median(times[label]) for label in ("dense", "compressed"))
    return {
        "shape": list(shape),
        "density": density,
        "form": sparse[0].weight_form.form,
        "dense_us": dense_us,
        "compressed_us": compressed_us,
        "speedup": dense_us / compressed_us,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/conv_speed.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for shape in SHAPES:
            for density in DENSITIES:
                row = measure(shape, density, args.repeats, Path(folder))
                rows.append(row)
                in_channels, out_channels, kernel, size = shape
                print(
                    f"conv {in_channels}->{out_channels} {kernel}x{kernel} on {size}x{size}, {density:.0%} kept "
                    f"({row['form']}): dense {row['dense_us']:.0f} us, compressed {row['compressed_us']:.0f} us, "
                    f"{row['speedup']:.2f}x",
                    flush=True,
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
