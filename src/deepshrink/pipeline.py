"""The one place the stages are composed: reference -> [low-rank] -> prune -> quantize -> encode -> report.

Each stage's result is cached in the run directory under a key that covers the stage's recipe
section and everything that fed it (the reference's weights, the data, the seed, the previous
stage's key), so a rerun of the same recipe skips finished stages and a changed section redoes
that stage and the ones after it. Every file is written atomically: interrupting a run at any
point leaves the finished stages on disk and no half-written file.

The accuracy reported as "compressed" is measured on the model decoded from the written .dcz
file, never on the model in memory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from deepshrink import stages
from deepshrink.checkpoint import STRUCTURE_KEY, load_checkpoint, load_state_into, save_checkpoint, save_state_dict
from deepshrink.data import DataSplits
from deepshrink.errors import ConfigError, ModelError
from deepshrink.layers import compressible_layers
from deepshrink.lowrank import apply_structure
from deepshrink.recipe import Recipe, load_recipe, recipe_from_dict
from deepshrink.stages import Loaders
from deepshrink.train import evaluate, resolve_device


@dataclass
class StageRun:
    name: str
    key: str
    cached: bool
    seconds: float
    log: dict = field(default_factory=dict)


@dataclass
class RunResult:
    """What `compress` produced: the file, the accuracies that count, and the report's data."""

    path: Path
    run_dir: Path
    model_name: str
    reference_accuracy: float
    compressed_accuracy: float  # of the model decoded from `path`
    file_bytes: int
    parameter_bytes: int
    stages: list[StageRun]
    report: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.parameter_bytes / self.file_bytes


def _as_recipe(recipe: Recipe | str | os.PathLike | dict) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    return load_recipe(recipe)


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def weights_digest(model: nn.Module) -> str:
    """A content hash of a model's state_dict: the identity of a stage's input."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise ModelError(f"compress() needs a torch.nn.Module, got {type(model).__name__}")
    if not compressible_layers(model):
        raise ModelError(
            f"{type(model).__name__} has no Linear, Conv1d, Conv2d or Embedding layer; there is nothing to compress"
        )
    parametrized = [name for name, module in model.named_modules() if hasattr(module, "parametrizations")]
    if parametrized:
        raise ModelError(
            f"the model passed to compress() is already pruned or shared ({', '.join(parametrized[:3])}); "
            "pass the trained reference, or use the stage functions in deepshrink.stages"
        )


def compress(
    model: nn.Module,
    recipe: Recipe | str | os.PathLike | dict,
    data: DataSplits | Loaders,
    *,
    run_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> RunResult:
    """Run `recipe` on a trained `model` and write RUN_DIR/MODEL.dcz and the report.

    `data` is a DataSplits (from deepshrink.load_data) or your own loaders
    (`deepshrink.stages.Loaders.fixed(train, validation, test)`). `model` itself is never
    modified. With your own loaders, cached stages assume the same data on a rerun.
    """
    recipe = _as_recipe(recipe)
    _check_model(model)
    name = model_name or recipe.model or type(model).__name__.lower()
    run_dir = Path(run_dir or Path("runs") / name.replace(":", "-").replace("/", "-"))
    device = resolve_device(device)
    layer_names = list(compressible_layers(model))
    if recipe.lowrank is not None:  # a factored layer NAME becomes NAME.0 and NAME.1
        layer_names += [f"{name}.{part}" for name in layer_names for part in (0, 1)]
    recipe.check_layers(layer_names)
    if isinstance(data, DataSplits):
        loaders = Loaders.from_splits(data, recipe.data.test_subset)
        data_key = [data.fingerprint, len(data.train), recipe.data.test_subset]
    elif isinstance(data, Loaders):
        loaders, data_key = data, ["user loaders"]
    else:
        raise ConfigError(f"data should be a DataSplits (deepshrink.load_data()) or Loaders, got {type(data).__name__}")
    reference = copy.deepcopy(model).to(device).eval()
    input_key = _digest(weights_digest(reference), data_key, recipe.seed)
    reference_accuracy = evaluate(reference, loaders.test, device).accuracy
    stages_run: list[StageRun] = []
    current = reference
    key = input_key
    records = None

    structure = None  # set by the low-rank stage: the factored architecture, for every later load
    for stage in ("lowrank", "prune", "quantize"):
        settings = getattr(recipe, stage)
        if settings is None:
            continue
        key = _digest(key, stage, recipe.section(stage))
        path = run_dir / "stages" / f"{stage}-{key[:16]}.safetensors"
        records_path = path.with_suffix(".records.safetensors")
        started = time.perf_counter()
        if path.exists():
            checkpoint = load_checkpoint(path)
            current = load_state_into(copy.deepcopy(reference), checkpoint, path).to(device)
            log, cached = checkpoint.metadata["log"], True
            structure = checkpoint.metadata.get(STRUCTURE_KEY)
            if stage == "quantize":
                records = _load_records(records_path)
        else:
            _say(progress, f"{stage}: running")
            # Stages work on copies: the reference stays untouched for the report and the sweep.
            current = copy.deepcopy(reference) if current is reference else current
            options = {"seed": recipe.seed, "device": device, "progress": progress, "teacher": reference}
            if stage == "lowrank":
                log = stages.lowrank(current, settings, loaders, **options)
                structure = log["structure"]
            elif stage == "prune":
                log = stages.prune(current, settings, loaders, **options)
            else:
                records, log = stages.quantize(current, settings, loaders, **options)
                _save_records(records_path, records)
            metadata = {"stage": stage, "key": key, "log": log, STRUCTURE_KEY: structure}
            save_checkpoint(path, current, model_name=name, metadata=metadata)
            cached = False
        stages_run.append(StageRun(stage, key, cached, time.perf_counter() - started, log))
        _say(progress, f"{stage}: {'cached' if cached else 'done'} in {stages_run[-1].seconds:.1f}s ({path.name})")

    started = time.perf_counter()
    encode_key = _digest(key, "encode", recipe.section("encode"))
    out = run_dir / f"{name.replace(':', '-').replace('/', '-')}.dcz"
    cached = _file_key(out) == encode_key
    if not cached:
        from deepshrink.compressed import save_compressed

        settings = recipe.encode
        save_compressed(
            current.cpu(),
            out,
            model_name=name,
            index_bits=settings.index_bits,
            layout=settings.layout,
            coder=settings.coder,
            metadata={"stage_key": encode_key, "recipe": recipe.to_dict(), STRUCTURE_KEY: structure},
        )
    stages_run.append(StageRun("encode", encode_key, cached, time.perf_counter() - started))

    # The accuracy that counts: decode the file that was written into a fresh copy of the model.
    from deepshrink.compressed import read_state_dict

    decoded = apply_structure(copy.deepcopy(model), structure)
    state, _ = read_state_dict(out)
    decoded.load_state_dict(state)
    compressed_accuracy = evaluate(decoded, loaders.test, device).accuracy

    tradeoff = None
    if recipe.tradeoff is not None:
        tradeoff = _tradeoff(reference, recipe, loaders, input_key, run_dir, device, progress)

    from deepshrink.report import write_report

    result = RunResult(
        path=out,
        run_dir=run_dir,
        model_name=name,
        reference_accuracy=reference_accuracy,
        compressed_accuracy=compressed_accuracy,
        file_bytes=out.stat().st_size,
        parameter_bytes=4 * sum(t.numel() for t in model.state_dict().values() if t.is_floating_point()),
        stages=stages_run,
    )
    result.report = write_report(result, recipe, current.cpu(), records, tradeoff)
    return result


def _tradeoff(reference, recipe, loaders, input_key, run_dir, device, progress) -> dict:
    from deepshrink.files import atomic_output
    from deepshrink.tradeoff import tradeoff_curves

    key = _digest(input_key, "tradeoff", recipe.section("tradeoff"), recipe.section("encode"))
    path = run_dir / "stages" / f"tradeoff-{key[:16]}.json"
    if path.exists():
        return json.loads(path.read_text())
    _say(progress, "Figure 6 sweep: pruning only, quantization only, both")
    curves = tradeoff_curves(
        reference, recipe.tradeoff, recipe.encode, loaders, seed=recipe.seed, device=device, progress=progress
    )
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(curves, indent=1))
    return curves


def _file_key(path: Path) -> str | None:
    """The stage key a previously written .dcz carries, if it is there and readable."""
    if not path.exists():
        return None
    from deepshrink.encode.container import read_header
    from deepshrink.errors import FormatError

    try:
        return read_header(path).get("metadata", {}).get("stage_key")
    except FormatError:
        return None  # damaged: write it again


def _save_records(path: Path, records: dict) -> None:
    """The k-means records behind Figure 4, kept beside the cached quantize stage."""
    tensors, meta = {}, {}
    for name, record in records.items():
        for part in ("initial_centroids", "centroids", "sample"):
            tensors[f"{name}/{part}"] = torch.from_numpy(np.asarray(getattr(record, part), dtype=np.float64))
        meta[name] = {"bits": record.bits, "zero_code": record.zero_code, "inertia": float(record.inertia)}
    save_state_dict(path, tensors, model_name=None, metadata={"records": meta})


def _load_records(path: Path) -> dict | None:
    from deepshrink.quantize.shared import SharingRecord

    if not path.exists():
        return None
    checkpoint = load_checkpoint(path)
    records = {}
    for name, meta in checkpoint.metadata.get("records", {}).items():
        parts = {part: checkpoint.state_dict[f"{name}/{part}"].numpy() for part in ("initial_centroids", "centroids")}
        records[name] = SharingRecord(
            meta["bits"],
            meta["zero_code"],
            parts["initial_centroids"],
            parts["centroids"],
            meta["inertia"],
            checkpoint.state_dict[f"{name}/sample"].numpy(),
        )
    return records


def _say(progress: bool, message: str) -> None:
    if progress:
        tqdm.write(message)
