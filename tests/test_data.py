"""The IDX reader, data set discovery and the train/validation/test split."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from conftest import write_dataset, write_idx

from deepshrink.data import (
    DEFAULT_DATA_DIRECTORIES,
    find_data_files,
    load_data,
    make_loader,
    read_idx,
)
from deepshrink.errors import ConfigError, DataError, FormatError


def test_reads_the_real_fashion_mnist_files():
    """The four real files decode to the documented shapes and label range."""
    directory = DEFAULT_DATA_DIRECTORIES[0]
    images = read_idx(directory / "train-images-idx3-ubyte.gz")
    labels = read_idx(directory / "train-labels-idx1-ubyte.gz")
    test_images = read_idx(directory / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and set(np.unique(labels)) == set(range(10))
    assert test_images.shape == (10000, 28, 28)
    assert 0 < images.mean() < 255


def test_split_is_55k_5k_10k_disjoint_and_seeded(data):
    """The default split has the documented sizes, and the same seed gives the same split."""
    assert (len(data.train), len(data.validation), len(data.test)) == (55000, 5000, 10000)
    assert data.num_classes == 10
    again = load_data(seed=0)
    assert torch.equal(again.validation.tensors[0], data.validation.tensors[0])
    other = load_data(seed=1)
    assert not torch.equal(other.validation.tensors[0], data.validation.tensors[0])
    # Disjoint: no validation image appears in the training split.
    train_rows = {row.tobytes() for row in data.train.tensors[0][:, 0].numpy().reshape(55000, -1)}
    duplicates = sum(row.tobytes() in train_rows for row in data.validation.tensors[0][:, 0].numpy().reshape(5000, -1))
    assert duplicates < 10  # Fashion-MNIST has a handful of exact duplicate images across its set


def test_inputs_are_normalized_with_training_statistics(data):
    pixels = data.train.tensors[0]
    assert abs(pixels.mean().item()) < 1e-3
    assert abs(pixels.std().item() - 1.0) < 1e-3


def test_subset_keeps_the_normalization_of_the_full_split(data, small_data):
    """A model trained on a subset sees the same inputs when evaluated on the full data."""
    assert len(small_data.train) == 5000
    assert small_data.mean == data.mean and small_data.std == data.std
    assert torch.equal(small_data.test.tensors[0], data.test.tensors[0])


@pytest.mark.parametrize("compress", [False, True])
def test_round_trips_raw_and_gzipped(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / ("x.gz" if compress else "x"), array, compress=compress)
    assert np.array_equal(read_idx(path), array)


def test_reads_big_endian_integer_types(tmp_path):
    values = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "ints").write_bytes(bytes([0, 0, 0x0C, 1]) + (3).to_bytes(4, "big") + values.tobytes())
    assert read_idx(tmp_path / "ints").tolist() == [1, -2, 70000]


def test_every_truncation_of_a_file_is_a_format_error(tmp_path):
    """Cutting the file at any byte gives a FormatError that names the file, never a crash."""
    full = write_idx(tmp_path / "full", np.ones((3, 4, 5), dtype=np.uint8)).read_bytes()
    for length in range(len(full)):
        path = tmp_path / "cut"
        path.write_bytes(full[:length])
        with pytest.raises(FormatError, match="cut"):
            read_idx(path)


def test_truncated_gzip_is_a_format_error(tmp_path):
    full = gzip.compress(write_idx(tmp_path / "raw", np.ones((50, 28, 28), dtype=np.uint8)).read_bytes())
    (tmp_path / "cut.gz").write_bytes(full[: len(full) // 2])
    with pytest.raises(FormatError, match="cut.gz"):
        read_idx(tmp_path / "cut.gz")


def test_wrong_magic_is_a_format_error(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x89PNG" + bytes(100))
    with pytest.raises(FormatError, match="magic number"):
        read_idx(path)


def test_unknown_type_code_is_a_format_error(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 0]))
    with pytest.raises(FormatError, match="type code"):
        read_idx(path)


def test_extra_bytes_are_a_format_error(tmp_path):
    path = write_idx(tmp_path / "long", np.ones((2, 2), dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(FormatError, match="longer than its declared shape"):
        read_idx(path)


def test_huge_declared_shape_is_refused_before_allocating(tmp_path):
    path = tmp_path / "huge"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + b"\xff\xff\xff\xff" * 3)
    with pytest.raises(FormatError, match="limit"):
        read_idx(path)


def test_images_and_labels_must_agree(tmp_path):
    directory = write_dataset(tmp_path / "d")
    write_idx(directory / "train-labels-idx1-ubyte.gz", np.zeros(7, dtype=np.uint8), compress=True)
    with pytest.raises(FormatError, match="120 images but"):
        load_data(directory, validation_size=10)


def test_missing_data_lists_every_place_searched_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSHRINK_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as caught:
        find_data_files()
    message = str(caught.value)
    assert str(tmp_path / "nowhere") in message and "DEEPSHRINK_DATA" in message
    assert "dataset-fashion-mnist" in message


def test_explicit_directory_never_falls_back_to_another_data_set(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        find_data_files(tmp_path)


def test_environment_variable_is_used(tmp_path, monkeypatch):
    directory = write_dataset(tmp_path / "mine")
    monkeypatch.setenv("DEEPSHRINK_DATA", str(directory))
    assert find_data_files()["train_images"].parent == directory


def test_emnist_style_file_names_are_found(tmp_path):
    directory = write_dataset(tmp_path / "emnist", prefix="emnist-digits-")
    splits = load_data(directory, validation_size=20)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (100, 20, 40)


def test_bad_split_arguments_name_the_value(tmp_path):
    directory = write_dataset(tmp_path / "d")
    with pytest.raises(ConfigError, match="validation_size=500"):
        load_data(directory, validation_size=500)
    with pytest.raises(ConfigError, match="train_subset=0"):
        load_data(directory, validation_size=10, train_subset=0)


def test_loader_yields_whole_batches_covering_the_split(small_data):
    loader = make_loader(small_data.validation, batch_size=1000, shuffle=True, seed=3)
    labels = torch.cat([targets for _, targets in loader])
    assert len(labels) == 5000
    assert torch.equal(labels.sort().values, small_data.validation.tensors[1].sort().values)
