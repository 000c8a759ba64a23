"""MNIST-format (IDX) data: a validating reader, data set discovery, splits and loaders.

Any directory holding the four IDX files of an MNIST-style data set works: Fashion-MNIST (the
default), MNIST, KMNIST, EMNIST-digits. Files may be gzipped or raw.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from deepshrink.errors import ConfigError, DataError, FormatError

ENVIRONMENT_VARIABLE = "DEEPSHRINK_DATA"
DEFAULT_DATA_DIRECTORIES = (Path("/usr/share/datasets/fashion-mnist"),)
HOW_TO_GET_DATA = (
    "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
    f"or point --data-dir or {ENVIRONMENT_VARIABLE} at a directory of MNIST-format IDX files"
)

# IDX type codes (third byte of the magic number) and the numpy dtypes they stand for.
# Multi-byte values in IDX files are big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# No MNIST-style file comes near this; the cap stops a lying header from asking for terabytes.
MAX_IDX_BYTES = 1 << 33
MAX_IDX_DIMENSIONS = 8


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or raw) into a numpy array, validating it fully.

    Checks the magic number, the type code, the number of dimensions, and that the payload
    length equals the product of the dimensions: no more and no less.

    Args:
        path: the file.

    Returns:
        The array, in the file's shape and type.

    Raises:
        FormatError: any mismatch, naming the file.
        DataError: the file cannot be opened.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            magic = stream.read(4)
            if len(magic) < 4:
                raise FormatError(f"{path}: truncated IDX file: {len(magic)} bytes, too short for the magic number")
            zero_a, zero_b, type_code, dimension_count = magic
            if zero_a != 0 or zero_b != 0 or type_code not in _IDX_DTYPES:
                raise FormatError(
                    f"{path}: not an IDX file: magic number {magic.hex()} should be 0000TTNN "
                    f"with type code TT in {sorted(f'{code:02x}' for code in _IDX_DTYPES)}"
                )
            if not 1 <= dimension_count <= MAX_IDX_DIMENSIONS:
                raise FormatError(
                    f"{path}: IDX file declares {dimension_count} dimensions; expected 1 to {MAX_IDX_DIMENSIONS}"
                )
            dimension_bytes = stream.read(4 * dimension_count)
            if len(dimension_bytes) < 4 * dimension_count:
                raise FormatError(f"{path}: truncated IDX header: the {dimension_count} dimension sizes are incomplete")
            shape = struct.unpack(f">{dimension_count}I", dimension_bytes)
            dtype = _IDX_DTYPES[type_code]
            expected = int(np.prod(shape, dtype=np.uint64)) * dtype.itemsize
            if expected > MAX_IDX_BYTES:
                raise FormatError(
                    f"{path}: IDX header declares shape {shape} ({expected} bytes), over the {MAX_IDX_BYTES}-byte limit"
                )
            payload = stream.read(expected)
            if len(payload) != expected:
                raise FormatError(
                    f"{path}: truncated IDX file: shape {shape} needs {expected} bytes of data, found {len(payload)}"
                )
            if stream.read(1):
                raise FormatError(f"{path}: IDX file is longer than its declared shape {shape}; the file is corrupt")
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        if isinstance(error, FileNotFoundError):
            raise DataError(f"{path}: no such file; {HOW_TO_GET_DATA}") from error
        raise FormatError(f"{path}: cannot read IDX file: {error}") from error
    return np.frombuffer(payload, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


# Each role maps to file-name patterns; EMNIST prefixes its names (emnist-digits-train-...).
_ROLE_PATTERNS = {
    "train_images": ("*train-images-idx3-ubyte", "*train-images-idx3-ubyte.gz", "*train-images.idx3-ubyte"),
    "train_labels": ("*train-labels-idx1-ubyte", "*train-labels-idx1-ubyte.gz", "*train-labels.idx1-ubyte"),
    "test_images": (
        "*t10k-images-idx3-ubyte",
        "*t10k-images-idx3-ubyte.gz",
        "*test-images-idx3-ubyte",
        "*test-images-idx3-ubyte.gz",
        "*t10k-images.idx3-ubyte",
    ),
    "test_labels": (
        "*t10k-labels-idx1-ubyte",
        "*t10k-labels-idx1-ubyte.gz",
        "*test-labels-idx1-ubyte",
        "*test-labels-idx1-ubyte.gz",
        "*t10k-labels.idx1-ubyte",
    ),
}


def _find_files(directory: Path) -> dict[str, Path] | None:
    if not directory.is_dir():
        return None
    found: dict[str, Path] = {}
    for role, patterns in _ROLE_PATTERNS.items():
        matches = sorted({match for pattern in patterns for match in directory.glob(pattern)})
        if len(matches) > 1:
            raise DataError(
                f"{directory}: several files could be the {role.replace('_', ' ')}: "
                f"{', '.join(match.name for match in matches)}; keep one data set per directory"
            )
        if not matches:
            return None
        found[role] = matches[0]
    return found


def find_data_files(data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Locate the four IDX files.

    Order: the explicit `data_dir`, else the DEEPSHRINK_DATA environment variable, else the
    default Debian location. An explicit choice that holds no data set is an error: falling
    back to another data set would silently measure the wrong thing.
    """
    if data_dir is not None:
        candidates = [(Path(data_dir), "--data-dir")]
    elif os.environ.get(ENVIRONMENT_VARIABLE):
        candidates = [(Path(os.environ[ENVIRONMENT_VARIABLE]), ENVIRONMENT_VARIABLE)]
    else:
        candidates = [(directory, "default location") for directory in DEFAULT_DATA_DIRECTORIES]
    for directory, _ in candidates:
        found = _find_files(directory)
        if found is not None:
            return found
    searched = "; ".join(f"{directory} ({source})" for directory, source in candidates)
    raise DataError(
        f"no MNIST-format data set found. Searched: {searched}. Each place needs "
        f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        f"t10k-labels-idx1-ubyte (optionally .gz). To fix: {HOW_TO_GET_DATA}"
    )


@dataclass(frozen=True)
class DataSplits:
    """A data set split into train / validation / test, normalized with train statistics.

    Images are float32 tensors of shape N x 1 x H x W, labels int64. Hyperparameters are chosen
    on `validation`; `test` is used only to report.
    """

    train: TensorDataset
    validation: TensorDataset
    test: TensorDataset
    mean: float
    std: float
    num_classes: int
    source: Path
    fingerprint: str


def _images_and_labels(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise FormatError(
            f"{images_path}: images must have 3 dimensions (count, height, width), found shape {images.shape}"
        )
    if labels.ndim != 1:
        raise FormatError(f"{labels_path}: labels must have 1 dimension, found shape {labels.shape}")
    if len(images) != len(labels):
        raise FormatError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    return images, labels


def fingerprint_files(paths: list[Path]) -> str:
    """A short content hash of data files, so cached results are tied to the exact data."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def load_data(
    data_dir: str | os.PathLike | None = None,
    validation_size: int = 5000,
    seed: int = 0,
    train_subset: int | None = None,
) -> DataSplits:
    """Load an MNIST-format data set with a fixed, seeded train/validation split.

    Args:
        data_dir: a directory of IDX files (gzipped or not); default $DEEPSHRINK_DATA, then the
            installed Fashion-MNIST.
        validation_size: examples held out of the training files for validation.
        seed: the seed of the split's shuffle.
        train_subset: keep only the first N examples of the (shuffled) training split, for
            quick experiments and tests.

    Returns:
        DataSplits(train, validation, test, source, fingerprint); the default gives
        Fashion-MNIST's 55,000 / 5,000 / 10,000.

    Raises:
        DataError: no data set is found or a file cannot be read.
        FormatError: an IDX file is malformed.
        ConfigError: the validation size does not fit the training split.
    """
    files = find_data_files(data_dir)
    train_images, train_labels = _images_and_labels(files["train_images"], files["train_labels"])
    test_images, test_labels = _images_and_labels(files["test_images"], files["test_labels"])
    if train_images.shape[1:] != test_images.shape[1:]:
        raise FormatError(
            f"train images are {train_images.shape[1:]} but test images are {test_images.shape[1:]}; "
            "they must come from the same data set"
        )
    if not 0 < validation_size < len(train_images):
        raise ConfigError(f"validation_size={validation_size} must be between 1 and {len(train_images) - 1}")
    order = np.random.default_rng(seed).permutation(len(train_images))
    validation_index, train_index = order[:validation_size], order[validation_size:]
    # Statistics come from the whole training split, never from a subset, so that a model
    # trained on a subset sees the same inputs as when it is evaluated later.
    train_pixels = train_images[train_index].astype(np.float32) / 255.0
    mean = float(train_pixels.mean())
    std = float(train_pixels.std())
    del train_pixels
    if train_subset is not None:
        if train_subset < 1:
            raise ConfigError(f"train_subset={train_subset} must be a positive number of examples")
        train_index = train_index[:train_subset]

    def as_tensors(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
        pixels = torch.from_numpy(images.astype(np.float32) / 255.0)
        pixels = ((pixels - mean) / std).unsqueeze(1).contiguous()
        return TensorDataset(pixels, torch.from_numpy(labels.astype(np.int64)))

    return DataSplits(
        train=as_tensors(train_images[train_index], train_labels[train_index]),
        validation=as_tensors(train_images[validation_index], train_labels[validation_index]),
        test=as_tensors(test_images, test_labels),
        mean=mean,
        std=std,
        num_classes=int(max(train_labels.max(), test_labels.max())) + 1,
        source=files["train_images"].parent,
        fingerprint=fingerprint_files([files[role] for role in sorted(files)]),
    )


def make_loader(dataset: TensorDataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """An ordinary DataLoader that draws whole batches by index.

    Indexing an in-memory TensorDataset with a list of indices is one gather instead of
    `batch_size` Python calls, which makes MNIST-sized training several times faster.

    Args:
        dataset: an in-memory TensorDataset.
        batch_size: examples per batch (the last batch may be smaller).
        shuffle: reshuffle every epoch, from `seed`.
        seed: the seed of the shuffles.

    Returns:
        A torch DataLoader.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be a positive integer")
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None)
