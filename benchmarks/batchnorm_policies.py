"""BatchNorm while compressing a network that has it: fold, freeze and train, on a 1-D CNN for
multi-label tone detection (tests/synthetic.py: made with numpy, no download).

Each policy runs the same recipe (80% pruned in 2 rounds of 2 epochs, 5-bit codebooks with one
epoch of centroid fine-tuning) from the same trained model, and reports the test label accuracy
of the model decoded from the file, the file's size, and the size of zstd -19 of the fp32
state_dict (safetensors bytes), in one run.

    .venv/bin/python benchmarks/batchnorm_policies.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors.torch import save as safetensors_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from synthetic import tone_signals, trained_tone_network  # noqa: E402

import deepshrink  # noqa: E402

RECIPE = {
    "task": "multilabel",
    "prune": {"sparsity": {"*": 0.8}, "rounds": 2, "retrain_epochs": 2, "batch_size": 64},
    "quantize": {"bits": {"*": 5}, "finetune_epochs": 1, "batch_size": 64},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for seed in range(args.seeds):
            signals, labels = tone_signals(3000, seed=2 * seed)
            test_signals, test_labels = tone_signals(1000, seed=2 * seed + 1)
            path = Path(directory) / f"tones-{seed}.npz"
            np.savez(path, x=signals, y=labels, x_test=test_signals, y_test=test_labels)
            model = trained_tone_network(signals, labels, epochs=4, seed=seed)
            state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
            zstd_bytes = len(zstandard.ZstdCompressor(level=19).compress(safetensors_bytes(state)))
            data = deepshrink.load_arrays(path, validation=0.1, seed=seed)
            for policy in ("fold", "freeze", "train"):
                started = time.perf_counter()
                result = deepshrink.run(
                    model,
                    RECIPE | {"batchnorm": policy, "seed": seed},
                    data,
                    run_dir=Path(directory) / f"{policy}-{seed}",
                    progress=False,
                )
                rows.append(
                    {
                        "seed": seed,
                        "batchnorm": policy,
                        "reference": result.reference_metric,
                        "compressed": result.compressed_metric,
                        "relative_change_percent": 100 * (result.compressed_metric / result.reference_metric - 1),
                        "file_bytes": result.file_bytes,
                        "ratio": result.ratio,
                        "zstd19_state_dict_bytes": zstd_bytes,
                        "seconds": time.perf_counter() - started,
                    }
                )
                row = rows[-1]
                print(
                    f"seed {seed} {policy:7s} label accuracy {row['reference']:.4f} -> {row['compressed']:.4f} "
                    f"({row['relative_change_percent']:+.2f}%), {row['file_bytes']:,} B ({row['ratio']:.1f}x), "
                    f"zstd -19 state_dict {zstd_bytes:,} B, {row['seconds']:.1f} s",
                    flush=True,
                )
    out = Path(__file__).resolve().parent / "results" / "batchnorm_policies.json"
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
