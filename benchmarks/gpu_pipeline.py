"""The pipeline on the GPU against the CPU, in the same run (issue 21, point 4).

Two parts, each on every device given (default: cpu, then cuda where torch sees one):

- LeNet-5 on Fashion-MNIST: a reference trained 2 epochs on that device, then a short recipe
  through `deepshrink.run` (magnitude pruning, one round of 2 epochs retrained with
  distillation; 5-bit sharing, one epoch of centroid fine-tuning; encoding): each stage's
  seconds, the test accuracy of the model decoded from the file, and the file's bytes.
- A VGG-16-shaped model (vgg16_scale.vgg16, 138M weights): masks by selection (7.6% kept) on
  the device, weight sharing (k-means runs on the CPU wherever the weights are: the codebooks
  are small and its Lloyd iterations are numba code), then STEPS SGD steps of fine-tuning with
  the masks and codebooks held, on random 224x224 images in batches of BATCH, and the save.

k-means stays on the CPU by design (quantize/shared.py moves each layer's kept weights there
and the codebook and codes back). Prints one line per step and writes results/gpu_pipeline.json.

    .venv/bin/python benchmarks/gpu_pipeline.py [--devices cpu cuda] [--skip-vgg]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
STEPS = 3
BATCH = 8
RECIPE = """\
model: lenet-5
seed: 0
prune:
  sparsity: {conv1: 0.34, conv2: 0.88, fc1: 0.92, fc2: 0.81}
  rounds: 1
  retrain_epochs: 2
  distill: {temperature: 4.0, alpha: 0.5}
quantize:
  bits: {"*": 5}
  finetune_epochs: 1
encode:
  index_bits: {"*": 5}
"""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lenet5(device: torch.device, data) -> dict:
    import deepshrink
    from deepshrink.models import build_model
    from deepshrink.recipe import parse_recipe

    torch.manual_seed(0)
    model = build_model("lenet-5")
    started = time.perf_counter()
    deepshrink.fit(
        model,
        deepshrink.make_loader(data.train, 128, shuffle=True, seed=0),
        deepshrink.TrainConfig(epochs=2),
        device=device,
        progress=False,
    )
    synchronize(device)
    reference_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        result = deepshrink.run(model.cpu(), parse_recipe(RECIPE), data, run_dir=directory, device=str(device))
        total = time.perf_counter() - started
    return {
        "reference_training_seconds": reference_seconds,
        "stage_seconds": {stage.name: stage.seconds for stage in result.stages},
        "run_seconds": total,
        "reference_accuracy": result.reference_metric,
        "compressed_accuracy": result.compressed_metric,
        "file_bytes": result.file_bytes,
    }


def vgg(device: torch.device) -> dict:
    from vgg16_scale import SPARSITY, vgg16

    import deepshrink
    from deepshrink.layers import compressible_weights
    from deepshrink.prune.masks import sparsity_mask
    from deepshrink.prune.module import apply_masks
    from deepshrink.quantize.shared import share_weights

    torch.manual_seed(0)
    model = vgg16()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.distributions.Laplace(0.0, 0.02).sample(parameter.shape))
    model.to(device)
    seconds = {}
    weights = compressible_weights(model)
    started = time.perf_counter()
    apply_masks(model, {name: sparsity_mask(weight.value, SPARSITY) for name, weight in weights.items()})
    synchronize(device)
    seconds["prune"] = time.perf_counter() - started
    started = time.perf_counter()
    share_weights(model, None)
    synchronize(device)
    seconds["share"] = time.perf_counter() - started
    optimizer = torch.optim.SGD([parameter for parameter in model.parameters() if parameter.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(STEPS):
        images = torch.randn(BATCH, 3, 224, 224, generator=generator).to(device)
        labels = torch.randint(0, 1000, (BATCH,), generator=generator).to(device)
        synchronize(device)
        started = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        synchronize(device)
        steps.append(time.perf_counter() - started)
    seconds["fine_tune_step"] = min(steps)
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        path = deepshrink.save_compressed(model.cpu(), Path(directory) / "vgg16.dcz", model_name="vgg16_scale:vgg16")
        seconds["save"] = time.perf_counter() - started
        seconds["file_bytes"] = path.stat().st_size
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    parser.add_argument("--devices", nargs="+", default=default_devices)
    parser.add_argument("--skip-vgg", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "gpu_pipeline.json"))
    args = parser.parse_args()
    import deepshrink
    from deepshrink.runtime.bench import machine_description

    data = deepshrink.load_data()
    results = {"machine": machine_description(), "command": " ".join(sys.argv), "devices": {}}
    if torch.cuda.is_available():
        results["machine"]["gpu"] = torch.cuda.get_device_name(0)
    for name in args.devices:
        device = torch.device(name)
        row = {"lenet5": lenet5(device, data)}
        print(name, "lenet-5", json.dumps(row["lenet5"]), flush=True)
        if not args.skip_vgg:
            row["vgg16"] = vgg(device)
            print(name, "vgg-16", json.dumps(row["vgg16"]), flush=True)
        results["devices"][name] = row
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
