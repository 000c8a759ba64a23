"""Shared fixtures. The real data set is required: `make test` installs it when missing."""

from __future__ import annotations

import gzip
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from deepshrink.cli import main
from deepshrink.data import DataSplits, load_data


@pytest.fixture(scope="session")
def data() -> DataSplits:
    """The default data set (Fashion-MNIST) with the standard 55k/5k/10k split."""
    return load_data()


@pytest.fixture(scope="session")
def small_data() -> DataSplits:
    """The same data set with only 5,000 training examples, for quick training tests."""
    return load_data(train_subset=5000)


@pytest.fixture(scope="session")
def small_lenet_state(small_data) -> dict:
    """The weights of a LeNet-300-100 trained 3 epochs on `small_data` (seed 0), about 81% top-1:
    a trained starting point for stages that retrain. Build a model and load them: each test
    gets its own copy."""
    import torch

    import deepshrink
    from deepshrink.models import build_model

    torch.manual_seed(0)
    model = build_model("lenet-300-100")
    loader = deepshrink.make_loader(small_data.train, 128, shuffle=True, seed=0)
    deepshrink.fit(model, loader, deepshrink.TrainConfig(epochs=3), progress=False)
    return {key: value.clone() for key, value in model.state_dict().items()}


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write `array` (uint8) as an IDX file, the format our reader must accept."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path


def write_dataset(directory: Path, prefix: str = "", train: int = 120, test: int = 40, seed: int = 0) -> Path:
    """A tiny MNIST-format data set, named as MNIST (or EMNIST, with a prefix) names its files."""
    generator = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("t10k", test)):
        write_idx(
            directory / f"{prefix}{split}-images-idx3-ubyte.gz",
            generator.integers(0, 256, (count, 28, 28), dtype=np.uint8),
            compress=True,
        )
        write_idx(
            directory / f"{prefix}{split}-labels-idx1-ubyte.gz",
            generator.integers(0, 10, count, dtype=np.uint8),
            compress=True,
        )
    return directory


@pytest.fixture
def cli(capsys):
    """The command line run in this process: `main` with the arguments, its exit code and what it
    printed (captured), as `run_cli` returns them from a subprocess."""

    def call(*arguments: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            code = main(["--quiet", *arguments])
        except SystemExit as exit_:  # argparse: --help, and usage errors
            code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(list(arguments), code, captured.out, captured.err)

    return call
