"""Reference models: trained once with the registered settings, then reused from a cache.

Every compression result is measured against these checkpoints, so they must be easy to
reproduce. The cache key covers the model name, the training config and a hash of the data
files, so a change of any of them trains a new reference instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deepshrink.checkpoint import load_checkpoint, load_state_into, save_checkpoint
from deepshrink.data import DataSplits, make_loader
from deepshrink.models import build_model, get_model_spec
from deepshrink.train import TrainConfig, evaluate, fit, resolve_device

CACHE_ENVIRONMENT_VARIABLE = "DEEPSHRINK_CACHE"


def cache_directory(explicit: str | os.PathLike | None = None) -> Path:
    if explicit is not None:
        return Path(explicit)
    if os.environ.get(CACHE_ENVIRONMENT_VARIABLE):
        return Path(os.environ[CACHE_ENVIRONMENT_VARIABLE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deepshrink"


@dataclass(frozen=True)
class TrainedModel:
    model: nn.Module
    path: Path
    test_accuracy: float
    validation_accuracy: float
    seconds: float
    from_cache: bool


def train_model(
    name: str,
    data: DataSplits,
    config: TrainConfig,
    *,
    device: str = "auto",
    progress: bool = True,
) -> tuple[nn.Module, float]:
    """Build `name` with the config's seed and train it on the training split.

    Returns the model and the wall time. Weight initialisation draws from a forked RNG, so the
    caller's global random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(name)
    started = time.perf_counter()
    fit(
        model,
        make_loader(data.train, config.batch_size, shuffle=True, seed=config.seed),
        config,
        validation_loader=make_loader(data.validation, 1000, shuffle=False),
        device=resolve_device(device),
        progress=progress,
        description=name,
    )
    return model, time.perf_counter() - started


def reference_path(name: str, data: DataSplits, cache_dir: str | os.PathLike | None = None) -> Path:
    spec = get_model_spec(name)
    identity = [name, spec.reference_training.to_dict(), data.fingerprint]
    if spec.revision:
        identity.append(spec.revision)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return cache_directory(cache_dir) / "references" / f"{name}-{key[:12]}.safetensors"


def reference_model(
    name: str,
    data: DataSplits,
    *,
    cache_dir: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = True,
) -> TrainedModel:
    """Load the cached reference for `name` on `data`, training and caching it if missing."""
    path = reference_path(name, data, cache_dir)
    test_loader = make_loader(data.test, 1000, shuffle=False)
    if path.exists():
        checkpoint = load_checkpoint(path)
        model = load_state_into(build_model(name), checkpoint, path)
        test = evaluate(model, test_loader, device)
        return TrainedModel(
            model,
            path,
            test.accuracy,
            checkpoint.metadata.get("validation_accuracy", float("nan")),
            checkpoint.metadata.get("train_seconds", 0.0),
            from_cache=True,
        )
    config = get_model_spec(name).reference_training
    model, seconds = train_model(name, data, config, device=device, progress=progress)
    validation = evaluate(model, make_loader(data.validation, 1000, shuffle=False), device)
    test = evaluate(model, test_loader, device)
    save_checkpoint(
        path,
        model.cpu(),
        model_name=name,
        metadata={
            "training": config.to_dict(),
            "data_fingerprint": data.fingerprint,
            "data_source": str(data.source),
            "validation_accuracy": validation.accuracy,
            "test_accuracy": test.accuracy,
            "train_seconds": seconds,
            "torch_version": torch.__version__,
        },
    )
    return TrainedModel(model, path, test.accuracy, validation.accuracy, seconds, from_cache=False)
