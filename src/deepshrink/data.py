"""Data: splits and loaders over in-memory tensors, from MNIST-format (IDX) image files or from
arrays of any shape.

- `load_data`: a directory holding the four IDX files of an MNIST-style data set (Fashion-MNIST,
  the default, MNIST, KMNIST, EMNIST-digits), gzipped or raw, scaled to [0, 1] and standardised.
- `load_arrays`: an .npz or .safetensors file of arrays `x` and optionally `y`, `x_test`,
  `y_test`, of any shape and dtype, used as they are (nothing is rescaled unless asked). Without
  `y` the splits hold inputs only, and the pipeline makes targets from the original model. A
  model that takes several inputs (token ids and an attention mask) gets one array per argument,
  `x.input_ids`, `x.attention_mask` (and `x_test.input_ids`, ...), passed as keyword arguments,
  or `x.0`, `x.1`, passed in that order (`inputs.py`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from deepshrink import distributed
from deepshrink.errors import ConfigError, DataError, FormatError
from deepshrink.inputs import Examples, in_memory, inputs_of, is_several, targets_of, tensors

if TYPE_CHECKING:
    from deepshrink.stages.base import Loaders

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

    Args:
        data_dir: a directory chosen by the caller.

    Returns:
        Each file's role -> its path.

    Raises:
        DataError: no place searched holds the four files, or a place holds several candidates
            for one of them.
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
    """A data set split into train / validation / test TensorDatasets of (inputs, targets), or
    of inputs alone when the data has no targets (`labelled` is False); for a model that takes
    several inputs, `inputs.Examples` whose inputs are a dict or tuple of tensors.

    Hyperparameters are chosen on `validation`; `test` is used only to report. Data without a
    test split reports on the validation split, and says so (`test_is_validation`). IDX images
    are float32 N x 1 x H x W standardised with the training split's `mean` and `std`, labels
    int64; arrays from `load_arrays` are as given (`mean` 0 and `std` 1 unless scaled).
    """

    train: TensorDataset | Examples
    validation: TensorDataset | Examples
    test: TensorDataset | Examples
    source: Path
    fingerprint: str
    mean: float = 0.0
    std: float = 1.0
    num_classes: int | None = None
    test_is_validation: bool = False

    @property
    def labelled(self) -> bool:
        """Whether the splits hold targets as well as inputs."""
        return targets_of(self.train) is not None

    @property
    def input_names(self) -> tuple[str, ...] | None:
        """The several inputs' names (keywords, or positions "0", "1", ...); None for one input."""
        inputs = inputs_of(self.train)
        return tuple(name for name, _ in tensors(inputs)) if is_several(inputs) else None

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """One example's shape (no batch dimension), as the model sees it; None for several inputs."""
        inputs = inputs_of(self.train)
        return None if is_several(inputs) else tuple(inputs.shape[1:])

    @property
    def input_dtype(self) -> str:
        """The inputs' dtype name: "float32", or "int64" for integer inputs (token ids); for several
        inputs, the first one's."""
        return str(tensors(inputs_of(self.train))[0][1].dtype).removeprefix("torch.")

    @property
    def name(self) -> str:
        """The data set's name for reports: its directory's or file's name."""
        return self.source.name if self.source.is_dir() else self.source.stem


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
    """A short content hash of data files, so cached results are tied to the exact data.

    Args:
        paths: the files, in a fixed order.

    Returns:
        The first 16 hex digits of their sha256.
    """
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


def make_loader(dataset: TensorDataset | Examples, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """An ordinary DataLoader that draws whole batches by index.

    Indexing an in-memory TensorDataset with a list of indices is one gather instead of
    `batch_size` Python calls, which makes MNIST-sized training several times faster.

    Under a process group of N processes (torchrun) each rank gets its shard: a
    `DistributedSampler` of the shuffled examples (the same permutation on every rank, from
    `seed` and the epoch `fit` sets), or every N-th example from its rank on for an evaluation
    loader (`evaluate` sums over ranks, so each example counts once). `batch_size` stays the
    global batch: each rank draws ceil(batch_size / N) of it, so a recipe's learning rate means
    the same on any number of processes.

    Args:
        dataset: an in-memory TensorDataset (or Examples, for several inputs).
        batch_size: examples per batch over all ranks (the last batch may be smaller).
        shuffle: reshuffle every epoch, from `seed`.
        seed: the seed of the shuffles.

    Returns:
        A torch DataLoader.

    Raises:
        ConfigError: `batch_size` is below 1.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be a positive integer")
    ranks, rank = distributed.world_size(), distributed.rank()
    if ranks > 1:
        batch_size = -(-batch_size // ranks)
        if shuffle:
            sampler = DistributedSampler(dataset, num_replicas=ranks, rank=rank, shuffle=True, seed=seed)
        else:
            sampler = range(rank, len(dataset), ranks)
    elif shuffle:
        generator = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None)


# Array files from strangers are read before anything is allocated from them; this is far above
# any data set that fits the machines we run on, and stops a header from asking for terabytes.
MAX_ARRAY_BYTES = 1 << 36
ARRAY_NAMES = ("x", "y", "x_test", "y_test")
# One array per argument of a model that takes several inputs: x.input_ids (a keyword argument)
# or x.0 (the first positional one), and the same names after x_test for the test split.
_INPUT_PART = re.compile(r"^(x|x_test)\.([A-Za-z_]\w*|0|[1-9]\d{0,5})$")


def _is_array_name(name: str) -> bool:
    """Whether `name` is one of the arrays `load_arrays` reads (others in the file are ignored)."""
    return name in ARRAY_NAMES or name.startswith(("x.", "x_test."))


def _input_parts(arrays: dict[str, np.ndarray], split: str) -> dict[str, np.ndarray]:
    """{argument: array} of the split's inputs ("x" or "x_test"): {"": x} for one input array."""
    if split in arrays:
        return {"": arrays[split]}
    parts = {}
    for name, array in arrays.items():
        found = _INPUT_PART.match(name)
        if found and found.group(1) == split:
            parts[found.group(2)] = array
    return parts


def _input_count(arrays: dict[str, np.ndarray], split: str) -> int:
    """How many examples the split's inputs hold (checked alike by `_checked_arrays`)."""
    return len(next(iter(_input_parts(arrays, split).values())))


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The named arrays of an .npz (never unpickling: object arrays are refused) or .safetensors file."""
    if not path.is_file():
        raise DataError(f"{path}: no such data file; pass an .npz or .safetensors file with arrays x and optionally y")
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            arrays = load_file(path)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays = {}
                for name in archive.files:
                    if _is_array_name(name):
                        arrays[name] = archive[name]
        else:
            raise DataError(f"{path}: unknown data file type {path.suffix!r}; use .npz or .safetensors")
    except ValueError as error:  # object arrays (pickles) and malformed headers
        raise FormatError(
            f"{path}: cannot read the arrays ({error}); save plain numeric arrays, e.g. np.savez"
        ) from error
    except (OSError, EOFError) as error:
        raise FormatError(f"{path}: cannot read the arrays ({error})") from error
    except Exception as error:  # safetensors raises its own error type for a malformed file
        if isinstance(error, DataError):
            raise
        raise FormatError(f"{path}: not a readable {path.suffix} file ({error})") from error
    return _checked_arrays(arrays, path)


def _checked_arrays(arrays: dict, path) -> dict[str, np.ndarray]:
    """The named arrays (x or x.NAME, y, x_test or x_test.NAME, y_test), each checked: numeric,
    non-empty, within the size limit, targets one per input, both splits alike. `path` names their
    source in errors."""
    arrays = {name: array for name, array in arrays.items() if _is_array_name(name)}
    misnamed = [name for name in arrays if name not in ARRAY_NAMES and not _INPUT_PART.match(name)]
    if misnamed:
        raise DataError(
            f"{path}: {misnamed[0]!r} is not an input's name: name each input array x.ARGUMENT after the argument it "
            "fills (a Python identifier, e.g. x.input_ids), or x.0, x.1, ... by position"
        )
    if not all(isinstance(array, np.ndarray) for array in arrays.values()):
        kinds = {name: type(array).__name__ for name, array in arrays.items()}
        raise DataError(f"{path}: the arrays should be numpy arrays, found {kinds}")
    if not _input_parts(arrays, "x"):
        raise DataError(
            f"{path}: holds no array named 'x' (found {sorted(arrays) or 'none'}); save the inputs as x, "
            "e.g. np.savez(path, x=inputs, y=targets), or one array per argument of a model that takes several "
            "(x.input_ids, x.attention_mask)"
        )
    for name, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise FormatError(
                f"{path}: array {name} has dtype {array.dtype}; it should be numeric (bool, int or float)"
            )
        if array.ndim < 1 or len(array) == 0:
            raise DataError(f"{path}: array {name} has shape {array.shape}; it needs at least one example")
        if array.nbytes > MAX_ARRAY_BYTES:
            raise DataError(f"{path}: array {name} is {array.nbytes:,} bytes, over the {MAX_ARRAY_BYTES:,}-byte limit")
        _check_finite(array, name, path)
    for split in ("x", "x_test"):
        _check_input_parts(_input_parts(arrays, split), arrays, split, path)
    for inputs, targets in (("x", "y"), ("x_test", "y_test")):
        if targets in arrays and not _input_parts(arrays, inputs):
            raise DataError(f"{path}: has {targets} but no {inputs}; save the inputs that go with those targets")
        if targets in arrays and len(arrays[targets]) != _input_count(arrays, inputs):
            raise DataError(
                f"{path}: {inputs} holds {_input_count(arrays, inputs)} examples but {targets} holds "
                f"{len(arrays[targets])}; they must have one target per input"
            )
    has_test = bool(_input_parts(arrays, "x_test"))
    if ("y" in arrays) != ("y_test" in arrays) and has_test:
        raise DataError(f"{path}: give targets for both splits (y and y_test) or for neither")
    if has_test:
        train, test = _input_parts(arrays, "x"), _input_parts(arrays, "x_test")
        if sorted(train) != sorted(test):
            raise DataError(
                f"{path}: the training inputs are {_part_names(train, 'x')} but the test inputs are "
                f"{_part_names(test, 'x_test')}; give the test split the same inputs"
            )
        for name in train:
            if train[name].shape[1:] != test[name].shape[1:]:
                label = f"x.{name}" if name else "x"
                raise DataError(
                    f"{path}: {label} examples are {train[name].shape[1:]} but "
                    f"{label.replace('x', 'x_test', 1)} examples are {test[name].shape[1:]}; they must have the same "
                    "shape"
                )
    return arrays


def _part_names(parts: dict[str, np.ndarray], split: str) -> str:
    """The arrays of one split's inputs, for messages: "x" or "x.input_ids, x.attention_mask"."""
    return ", ".join(f"{split}.{name}" if name else split for name in parts)


def _check_input_parts(parts: dict[str, np.ndarray], arrays: dict, split: str, path) -> None:
    """One split's inputs are one array, or several named all by position (0, 1, ...) or all by
    keyword, holding the same number of examples."""
    if not parts:
        return
    named = [name for name in arrays if (found := _INPUT_PART.match(name)) and found.group(1) == split]
    if "" in parts and named:
        raise DataError(
            f"{path}: holds both {split} and {', '.join(named)}; give the inputs as {split} alone (one input) or as "
            "one array per argument"
        )
    positions = [name for name in parts if name.isdigit()]
    if positions and len(positions) != len(parts):
        raise DataError(
            f"{path}: the inputs {_part_names(parts, split)} mix positions and names; name them all by the "
            f"argument they fill ({split}.input_ids) or all by position ({split}.0, {split}.1)"
        )
    if positions and sorted(int(name) for name in positions) != list(range(len(positions))):
        raise DataError(
            f"{path}: the positional inputs {_part_names(parts, split)} should be numbered 0, 1, ... without gaps"
        )
    lengths = {name: len(array) for name, array in parts.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{split}.{name} {length}" for name, length in lengths.items())
        raise DataError(f"{path}: the inputs hold different numbers of examples ({described}); give one row each")


def _check_finite(array: np.ndarray, name: str, path) -> None:
    """A NaN or infinity in the data would surface much later as a diverged training or a wrong
    metric; name the first one here. Checked a block of examples at a time, so the check never
    holds more than a few megabytes beside the array."""
    if array.dtype.kind != "f":
        return
    step = max(1, (1 << 22) // max(1, array[0].size))
    for start in range(0, len(array), step):
        finite = np.isfinite(array[start : start + step])
        if not finite.all():
            count = sum(int((~np.isfinite(array[other : other + step])).sum()) for other in range(0, len(array), step))
            where = tuple(int(index) for index in np.argwhere(~finite)[0])
            where = (where[0] + start, *where[1:])
            raise DataError(
                f"{path}: array {name} holds {count:,} value(s) that are not finite (NaN or infinity), the first "
                f"at {name}[{', '.join(map(str, where))}]; remove or replace them before compressing"
            )


def _as_tensor(array: np.ndarray, name: str) -> torch.Tensor:
    """Integer arrays become int64 (class labels, token ids for an Embedding), the others float32."""
    if array.dtype.kind in "iu":
        return torch.from_numpy(array.astype(np.int64))
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _as_part(array: np.ndarray) -> torch.Tensor:
    """One of several inputs: integers int64 (token ids, an attention mask of 0 and 1), booleans
    kept boolean (a padding mask, which torch's attention reads as additive when it is a float),
    the others float32."""
    if array.dtype.kind == "b":
        return torch.from_numpy(np.ascontiguousarray(array))
    return _as_tensor(array, "x")


def _inputs_from(parts: dict[str, np.ndarray], index, scale: float | None):
    """The examples `index` selects of one split's inputs, as the model takes them: one tensor
    (scaled when asked), a dict of keyword arguments or a tuple of positional ones."""
    if "" in parts:
        tensor = _as_tensor(parts[""][index], "x")
        return tensor * float(scale) if scale is not None else tensor
    if all(name.isdigit() for name in parts):
        return tuple(_as_part(parts[str(position)][index]) for position in range(len(parts)))
    return {name: _as_part(array[index]) for name, array in parts.items()}


def load_arrays(
    path: str | os.PathLike | Mapping[str, np.ndarray | torch.Tensor],
    validation: float | int = 0.1,
    seed: int = 0,
    scale: float | None = None,
    train_subset: int | None = None,
) -> DataSplits:
    """Splits from an .npz or .safetensors file of arrays: `x` (inputs, any shape after the first,
    example, dimension, any numeric dtype) and optionally `y` (targets: integer class labels, or
    floats), `x_test` and `y_test`.

    Args:
        path: the file (.npz files are read without unpickling), or the arrays themselves:
            {"x": inputs, "y": targets, ...} of numpy arrays or CPU tensors.
        validation: the part of `x` held out for validation: a fraction in (0, 1) or a count of
            examples (at least 1, and at least 1 left to train on).
        seed: the seed of the split's shuffle.
        scale: multiply the inputs by this (e.g. 1/255 for 8-bit pixels); default as given.
        train_subset: keep only the first N examples of the (shuffled) training split.

    Returns:
        DataSplits over int64 inputs where `x` holds integers (token ids; `scale` makes them
        float), else float32; without `x_test` the test split is the validation split
        (`test_is_validation`), without `y` the splits hold inputs only (`labelled` is False).

    Raises:
        DataError: no `x`, `x` and `y` of different lengths, a split that leaves nothing, a
            missing file. FormatError: a file that cannot be read, or arrays that are not numeric.
        ConfigError: `validation`, `scale` or `train_subset` out of range.
    """
    if isinstance(path, Mapping):
        arrays = _checked_arrays(
            {
                name: value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
                for name, value in path.items()
            },
            IN_MEMORY,
        )
        return splits_from_arrays(arrays, IN_MEMORY, _fingerprint_arrays(arrays), validation, seed, scale, train_subset)
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(
            f"load_arrays takes a file or a dict of arrays, not a {type(path).__name__}; pass "
            "{'x': inputs, 'y': targets} (and optionally 'x_test', 'y_test')"
        )
    path = Path(path)
    return splits_from_arrays(
        _read_arrays(path), path, fingerprint_files([path]), validation, seed, scale, train_subset
    )


# What errors and the report call arrays given to load_arrays in memory.
IN_MEMORY = Path("<arrays in memory>")


def _fingerprint_arrays(arrays: dict[str, np.ndarray]) -> str:
    """A short content hash of arrays given in memory (names, dtypes, shapes and bytes), as
    `fingerprint_files` is of files: the same arrays give the same cached stages."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name} {array.dtype.str} {array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()[:16]


def splits_from_arrays(
    arrays: dict[str, np.ndarray],
    path: Path,
    fingerprint: str,
    validation: float | int = 0.1,
    seed: int = 0,
    scale: float | None = None,
    train_subset: int | None = None,
) -> DataSplits:
    """load_arrays for arrays already checked (`_checked_arrays`); `path` names their source.

    Args:
        arrays: checked arrays x, and optionally y, x_test, y_test.
        path: their source, named in errors.
        fingerprint: the data's content hash.
        validation: the validation split, a fraction in (0, 1) or a count of examples.
        seed: the seed of the split.
        scale: multiply the inputs by this (None: as they are).
        train_subset: keep only this many training examples.

    Returns:
        The DataSplits.

    Raises:
        ConfigError: `validation`, `scale` or `train_subset` is out of range.
        DataError: the arrays are too few to split.
    """
    count = _input_count(arrays, "x")
    if isinstance(validation, bool) or not isinstance(validation, int | float):
        raise ConfigError(f"validation={validation!r} should be a fraction in (0, 1) or a count of examples")
    if isinstance(validation, float) and not 0 < validation < 1:
        raise ConfigError(f"validation={validation!r} should be a fraction in (0, 1), e.g. 0.1, or a count")
    held = round(validation * count) if isinstance(validation, float) else validation
    if not 1 <= held < count:
        raise DataError(
            f"{path}: holding out {validation!r} of {count} examples for validation leaves "
            f"{max(held, 0)} to validate and {count - max(held, 0)} to train on; each needs at least one. "
            "Give more examples or a different validation fraction or count"
        )
    if scale is not None and not (isinstance(scale, int | float) and np.isfinite(scale) and scale != 0):
        raise ConfigError(f"scale={scale!r} should be a finite, non-zero number, e.g. 0.00392 (1/255)")
    if scale is not None and "x" not in arrays:
        raise ConfigError(
            f"scale={scale!r} multiplies one input array, and {path} gives several "
            f"({_part_names(_input_parts(arrays, 'x'), 'x')}); scale them before saving"
        )
    if train_subset is not None and train_subset < 1:
        raise ConfigError(f"train_subset={train_subset} must be a positive number of examples")
    order = np.random.default_rng(seed).permutation(count)
    validation_index, train_index = order[:held], order[held:]
    if train_subset is not None:
        train_index = train_index[:train_subset]
    labelled = "y" in arrays

    def split(inputs: str, index, targets: np.ndarray | None) -> TensorDataset | Examples:
        return in_memory(
            _inputs_from(_input_parts(arrays, inputs), index, scale),
            _as_tensor(targets, "y") if targets is not None else None,
        )

    train = split("x", train_index, arrays["y"][train_index] if labelled else None)
    held_out = split("x", validation_index, arrays["y"][validation_index] if labelled else None)
    has_test = bool(_input_parts(arrays, "x_test"))
    test = split("x_test", slice(None), arrays.get("y_test")) if has_test else held_out
    targets = arrays.get("y")
    classes = (
        int(targets.max()) + 1 if targets is not None and targets.dtype.kind in "iu" and targets.ndim == 1 else None
    )
    return DataSplits(
        train=train,
        validation=held_out,
        test=test,
        source=path,
        fingerprint=fingerprint,
        num_classes=classes,
        test_is_validation=not has_test,
    )


def load_splits(
    source: str | os.PathLike | None = None,
    validation: float | int | None = None,
    seed: int = 0,
    train_subset: int | None = None,
) -> DataSplits:
    """`load_any`, for the commands that need the data as splits of arrays.

    Args:
        source: as for `load_any`.
        validation: as for `load_any`.
        seed: the seed of the split.
        train_subset: keep only this many training examples.

    Returns:
        The DataSplits.

    Raises:
        ConfigError: `source` is a function that returns loaders, which only the pipeline takes.
    """
    splits = load_any(source, validation, seed, train_subset)
    if not isinstance(splits, DataSplits):
        raise ConfigError(
            f"data {source} gives loaders, which `run` takes; this needs arrays: return a dict of numpy arrays "
            "(x, y, x_test, y_test) or a deepshrink.DataSplits"
        )
    return splits


_FUNCTION_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def load_function_data(
    source: str, validation: float | int | None = None, seed: int = 0, train_subset: int | None = None
) -> DataSplits | Loaders:
    """The data `package.module:function` gives.

    Called with no arguments, the function returns a DataSplits, a dict of numpy arrays as an
    .npz file would hold them (x, optionally y, x_test, y_test), which are checked and split as
    `load_arrays` does, or your own `deepshrink.Loaders` (which the whole pipeline, `deepshrink
    run`, takes as they are).

    Args:
        source: "package.module:function".
        validation: for arrays, the validation split (default 10%).
        seed: the seed of the split.
        train_subset: for arrays, keep only this many training examples.

    Returns:
        A DataSplits, or the function's Loaders.

    Raises:
        ConfigError: the function cannot be imported.
        DataError: it returns something else, or arrays that `load_arrays` would refuse.
    """
    import importlib

    module_name, _, function_name = source.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(
            f"data {source!r}: cannot import {function_name} from {module_name} ({error}); is it on PYTHONPATH?"
        ) from error
    made = function()
    from deepshrink.stages.base import Loaders  # the stages import this module

    if isinstance(made, DataSplits | Loaders):
        return made
    if not isinstance(made, dict):
        raise DataError(
            f"data {source!r} returned {type(made).__name__}; it should return a dict of numpy arrays x, y, "
            "x_test, y_test (y and the test split optional), a deepshrink.DataSplits or deepshrink.Loaders"
        )
    arrays = _checked_arrays(made, source)
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode() + str(arrays[name].dtype).encode() + str(arrays[name].shape).encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return splits_from_arrays(
        arrays,
        Path(function_name),
        digest.hexdigest()[:16],
        0.1 if validation is None else validation,
        seed,
        train_subset=train_subset,
    )


def load_any(
    source: str | os.PathLike | None = None,
    validation: float | int | None = None,
    seed: int = 0,
    train_subset: int | None = None,
) -> DataSplits | Loaders:
    """`load_arrays` for an .npz or .safetensors file, `load_function_data` for
    `package.module:function` (when no such path exists), else `load_data` for a directory of
    IDX files (None: $DEEPSHRINK_DATA, then the installed Fashion-MNIST). `validation` is a
    fraction or a count; None keeps each loader's default (10% of arrays, 5,000 IDX images).

    Args:
        source: a file, a function path, a directory, or None.
        validation: the validation split, a fraction or a count.
        seed: the seed of the split.
        train_subset: keep only this many training examples.

    Returns:
        A DataSplits, or the Loaders a function returns.

    Raises:
        ConfigError: a fraction `validation` for IDX data.
    """
    if isinstance(source, str) and _FUNCTION_PATH.match(source) and not Path(source).exists():
        return load_function_data(source, validation, seed, train_subset)
    if source is not None and Path(source).suffix in (".npz", ".safetensors"):
        return load_arrays(source, 0.1 if validation is None else validation, seed, train_subset=train_subset)
    if validation is not None and not (isinstance(validation, int) and not isinstance(validation, bool)):
        raise ConfigError(f"validation={validation!r}: for IDX data give a count of examples, e.g. 5000")
    return load_data(source, 5000 if validation is None else validation, seed, train_subset)
