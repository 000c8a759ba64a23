"""Reference models: trained once with the registered settings, then reused from a cache.

Every compression result is measured against these checkpoints, so they must be easy to
reproduce. The cache key covers the model name, the training config and a hash of the data
files, so a change of any of them trains a new reference instead of reusing a stale one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deepshrink import distributed
from deepshrink.checkpoint import load_checkpoint, load_state_into, save_checkpoint
from deepshrink.data import DataSplits, make_loader
from deepshrink.errors import ConfigError
from deepshrink.models import build_model, get_model_spec
from deepshrink.tasks import Task, resolve_task
from deepshrink.train import TrainConfig, evaluate, fit, resolve_device

CACHE_ENVIRONMENT_VARIABLE = "DEEPSHRINK_CACHE"


def cache_directory(explicit: str | os.PathLike | None = None) -> Path:
    """Where references and downloads are cached.

    Args:
        explicit: a directory the caller chose, used as given.

    Returns:
        `explicit`, else $DEEPSHRINK_CACHE, else $XDG_CACHE_HOME/deepshrink (~/.cache/deepshrink).
    """
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
    test_metric: float
    validation_metric: float
    seconds: float
    from_cache: bool
    metric_name: str = "top-1 accuracy"


def train_model(
    name: str,
    data: DataSplits,
    config: TrainConfig,
    *,
    task: Task | str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> tuple[nn.Module, float]:
    """Build `name` with the config's seed and train it on the training split.

    Returns the model and the wall time. Weight initialisation draws from a forked RNG, so the
    caller's global random state is left as it was.

    Args:
        name: a registered model name.
        data: the data splits.
        config: the training settings (epochs, optimizer, seed, ...).
        task: the task (default classification).
        device: where to train.
        progress: show progress.

    Returns:
        (model, seconds).

    Raises:
        ModelError: `name` is not registered.
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
        task=task,
        progress=progress,
        description=name,
    )
    return model, time.perf_counter() - started


def reference_path(
    name: str, data: DataSplits, cache_dir: str | os.PathLike | None = None, *, seed: int | None = None
) -> Path:
    """Where the reference model `name` trained on `data` is cached.

    The file name carries a hash of the model, its reference training settings, the data's
    fingerprint and the model's revision, so a change to any of them trains a new reference.

    Args:
        name: a registered model name.
        data: the data splits (their fingerprint).
        cache_dir: the cache directory (default `cache_directory()`).
        seed: the training seed, in place of the reference settings' own (None: theirs).

    Returns:
        The checkpoint's path (it may not exist yet).

    Raises:
        ModelError: `name` is not registered.
    """
    spec = get_model_spec(name)
    identity = [name, _training(name, seed).to_dict(), data.fingerprint]
    if spec.revision:
        identity.append(spec.revision)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return cache_directory(cache_dir) / "references" / f"{name}-{key[:12]}.safetensors"


def _training(name: str, seed: int | None) -> TrainConfig:
    """The registered reference settings of `name`, at `seed` where one is given."""
    settings = get_model_spec(name).reference_training
    return settings if seed is None else dataclasses.replace(settings, seed=seed)


def reference_model(
    name: str,
    data: DataSplits,
    *,
    cache_dir: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = True,
    seed: int | None = None,
) -> TrainedModel:
    """The cached reference model for `name` on `data`, trained and cached when missing.

    The cache key is the model's name, its reference training settings and the data's
    fingerprint, so a change of any of them trains a new reference. Another seed gives another
    reference, trained the same way (a member of an ensemble teacher, `deepshrink.teachers`).

    Args:
        name: a registered model name.
        data: the data set (its fingerprint is part of the key).
        cache_dir: default $DEEPSHRINK_CACHE, then ~/.cache/deepshrink.
        device: where to train and evaluate.
        progress: progress bars while training.
        seed: the training seed in place of the registered settings' own (None: theirs).

    Returns:
        TrainedModel(model, path, test and validation top-1 accuracy, training seconds, from_cache).

    Raises:
        ModelError: the name is not registered.
        CheckpointError: a cached file cannot be read.
    """
    path = reference_path(name, data, cache_dir, seed=seed)
    test_loader = make_loader(data.test, 1000, shuffle=False)
    if distributed.all_ranks(path.exists()):  # under torchrun every rank trains, or none
        checkpoint = load_checkpoint(path)
        model = load_state_into(build_model(name), checkpoint, path)
        test = evaluate(model, test_loader, device)
        return TrainedModel(
            model,
            path,
            test.metric,
            checkpoint.metadata.get("validation_metric", float("nan")),
            checkpoint.metadata.get("train_seconds", 0.0),
            from_cache=True,
        )
    return train_and_save(name, data, _training(name, seed), path, device=device, progress=progress)


def train_and_save(
    name: str,
    data: DataSplits,
    config: TrainConfig,
    path: str | os.PathLike,
    *,
    task: Task | str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> TrainedModel:
    """Train `name` by `config` (see `train_model`) for `task` (default classification), measure
    it on the validation and test splits, and save it as a checkpoint at `path` with what it was
    trained on. Data without targets cannot train a model from scratch (ConfigError).

    Args:
        name: a registered model name.
        data: the data splits.
        config: the training settings.
        path: where to write the checkpoint.
        task: the task (default classification).
        device: where to train.
        progress: show progress.

    Returns:
        The TrainedModel (model on the CPU).

    Raises:
        ConfigError: the data have no targets.
        ModelError: `name` is not registered.
        OutputError: `path` cannot be written.
    """
    task = resolve_task(task)
    if not data.labelled:
        raise ConfigError(f"{data.source}: has inputs but no targets (y); training a model from scratch needs them")
    model, seconds = train_model(name, data, config, task=task, device=device, progress=progress)
    validation = evaluate(model, make_loader(data.validation, 1000, shuffle=False), device, task)
    test = evaluate(model, make_loader(data.test, 1000, shuffle=False), device, task)
    if not distributed.is_main_process():  # rank 0 writes; every rank holds the same model
        return TrainedModel(model.cpu(), Path(path), test.metric, validation.metric, seconds, False, task.metric.name)
    save_checkpoint(
        path,
        model.cpu(),
        model_name=name,
        metadata={
            "training": config.to_dict(),
            "data_fingerprint": data.fingerprint,
            "data_source": str(data.source),
            "train_examples": len(data.train),
            "task": task.name,
            "validation_metric": validation.metric,
            "test_metric": test.metric,
            "train_seconds": seconds,
            "torch_version": torch.__version__,
        },
    )
    return TrainedModel(model, Path(path), test.metric, validation.metric, seconds, False, task.metric.name)
