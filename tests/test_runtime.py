"""Running from the compressed form: codebook CSR kernels and layers against dense torch."""

from __future__ import annotations

import copy
import time
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional

from deepshrink.compressed import load_compressed, save_compressed
from deepshrink.encode import codec
from deepshrink.encode.sparse import to_sparse
from deepshrink.errors import ConfigError, ModelError
from deepshrink.prune.masks import sparsity_mask
from deepshrink.prune.module import apply_masks
from deepshrink.quantize.shared import share_weights
from deepshrink.runtime import blocked_avx2, forms, tiled
from deepshrink.runtime.choice import BATCH_RANGES, KINDS, fixed_choice, measure_linear, range_of
from deepshrink.runtime.kernels import codebook_matmul, codebook_matvec, csr_from_layout
from deepshrink.runtime.load import load_runtime, resident_weight_bytes
from deepshrink.runtime.modules import CompressedConv2d, CompressedLinear

RELATIVE = 1e-5


def relative_error(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> float:
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def random_codes(rows: int, columns: int, density: float, bits: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(seed)
    mask = generator.random((rows, columns)) < density
    codes = np.where(mask, generator.integers(1, 1 << bits, (rows, columns)), 0).astype(np.uint8)
    codebook = np.concatenate(([0.0], generator.normal(size=(1 << bits) - 1))).astype(np.float32)
    return codes, codebook


@pytest.mark.parametrize("layout", ["csr", "csc"])
@pytest.mark.parametrize(("rows", "columns", "density"), [(64, 300, 0.09), (37, 1000, 0.02), (10, 10, 1.0)])
def test_kernels_match_a_dense_product(layout, rows, columns, density):
    codes, codebook = random_codes(rows, columns, density, 5)
    indptr, indices, entry_codes = csr_from_layout(to_sparse(codes, 3, layout), int(np.count_nonzero(codes)))
    dense = codebook[codes.astype(np.int64)].astype(np.float64)
    vector = np.random.default_rng(1).normal(size=columns).astype(np.float32)
    out = np.empty(rows, dtype=np.float32)
    codebook_matvec(indptr, indices, entry_codes, codebook, vector, out)
    assert relative_error(out, dense @ vector) < RELATIVE
    batch = np.random.default_rng(2).normal(size=(columns, 7)).astype(np.float32)
    out = np.empty((rows, 7), dtype=np.float32)
    codebook_matmul(indptr, indices, entry_codes, codebook, batch, out)
    assert relative_error(out, dense @ batch) < RELATIVE


needs_avx512 = pytest.mark.skipif(not tiled.available(), reason="the AVX-512 tiled form's kernels need AVX-512F")
needs_blocked = pytest.mark.skipif(not blocked_avx2.available(), reason="the blocked form's kernels need AVX2")
# The vector form auto mode runs on this machine: tiled with AVX-512, blocked with AVX2.
VECTOR_FORM = "tiled" if tiled.available() else "blocked" if blocked_avx2.available() else None
needs_vector_form = pytest.mark.skipif(VECTOR_FORM is None, reason="no AVX-512 or AVX2 kernels on this CPU")


def own_bytes(weight) -> int:
    """What a form adds: its own arrays (the blocked form also keeps the per-entry arrays, for
    batches)."""
    return getattr(weight.storage, "own_nbytes", weight.nbytes)


def vector_form_fits(codebook) -> bool:
    """Whether auto mode's vector form on this machine holds the codebook."""
    classes = {"tiled": forms.TiledCodes, "blocked": forms.Avx2BlockedCodes}
    return VECTOR_FORM is not None and classes[VECTOR_FORM].fits(codebook)


def rebuilt(weight, form):
    """The same weight built again in another form, from its entries."""
    rows, columns, codes = weight.entries()
    order = np.lexsort((columns, rows))
    indptr = np.concatenate(([0], np.cumsum(np.bincount(rows, minlength=weight.shape[0]))))
    csr = (indptr, columns[order].astype(np.uint16), codes[order].astype(np.uint16))
    return forms.CodebookWeight(*csr, weight.storage.codebook, weight.shape, form=form)


def csr_weight(rows, columns, density, codes_count, seed, form=None, zero_code=True):
    """A CodebookWeight of random codes (code 0 the reserved zero when zero_code) and its dense matrix."""
    generator = np.random.default_rng(seed)
    mask = generator.random((rows, columns)) < density
    codes = np.where(mask, generator.integers(1, codes_count, (rows, columns)), 0).astype(np.uint16)
    codebook = generator.normal(size=codes_count).astype(np.float32)
    if zero_code:
        codebook[0] = 0.0
    indptr, indices, entry_codes = csr_from_layout(to_sparse(codes, 4, "csr"), int(mask.sum()))
    weight = forms.CodebookWeight(indptr, indices, entry_codes, codebook, (rows, columns), form=form)
    return weight, codebook[codes.astype(np.int64)].astype(np.float64)


@pytest.mark.parametrize(
    ("codes_count", "form"),
    [
        (32, "grouped"),
        (32, "per-entry"),
        (300, None),
        (300, "per-entry"),
        pytest.param(32, "tiled", marks=needs_avx512),
        pytest.param(32, "blocked", marks=needs_blocked),
        pytest.param(256, "blocked", marks=needs_blocked),
    ],
)
def test_every_compressed_form_computes_the_dense_product(codes_count, form):
    weight, dense = csr_weight(50, 700, 0.1, codes_count, 3, form)
    assert weight.form == (form or "per-entry")
    assert np.array_equal(weight.to_dense().numpy(), dense.astype(np.float32))
    generator = np.random.default_rng(4)
    for batch in (1, 2, 9, 40):
        inputs = generator.normal(size=(batch, 700)).astype(np.float32)
        assert relative_error(weight.product(inputs), inputs @ dense.T) < RELATIVE


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 70),
    columns=st.integers(1, 300),
    density=st.floats(0.01, 0.5),
    bits=st.integers(1, 8),
    batch=st.sampled_from([1, 2, 7, 64, 130]),
    seed=st.integers(0, 2**16),
)
def test_every_form_on_this_machine_matches_float64_over_random_layers(rows, columns, density, bits, batch, seed):
    """Random shapes, densities, bit widths and batch sizes, with empty rows and one-entry tiles
    where chance puts them: each form that applies on this machine (tiled with AVX-512, blocked
    with AVX2) against a float64 dense product."""
    codes_count = max(2, 2**bits)
    generator = np.random.default_rng(seed)
    inputs = generator.normal(size=(batch, columns)).astype(np.float32)
    for form in forms.FORMS:
        if form == "tiled" and not forms.TiledCodes.fits(np.zeros(codes_count, dtype=np.float32)):
            continue
        if form == "blocked" and not forms.Avx2BlockedCodes.fits(np.zeros(codes_count, dtype=np.float32)):
            continue
        weight, dense = csr_weight(rows, columns, density, codes_count, seed, form)
        expected = inputs.astype(np.float64) @ dense.T
        if np.any(expected):
            assert relative_error(weight.product(inputs), expected) < RELATIVE, form
        else:
            assert not np.any(weight.product(inputs)), form
        if batch == 1:  # the layer's batch-1 entry point, reading the tensor by address
            bias = generator.normal(size=rows).astype(np.float32)
            output = CompressedLinear(weight, torch.from_numpy(bias))(torch.from_numpy(inputs))
            assert relative_error(output, expected + bias) < RELATIVE, form


@needs_vector_form
@pytest.mark.parametrize(
    ("rows", "columns", "density", "codes_count"),
    [
        (37, 1000, 0.05, 32),  # rows not a multiple of 16 (or 8): the last chunk has empty lanes
        (8, 8, 1.0, 2),  # one code, every lane full: no padding at all in the blocked form
        (16, 32, 1.0, 32),  # one full tile: every step of every lane is a weight
        (100, 31, 0.3, 31),  # fewer columns than a tile; 31 entries leave a zero slot for padding
        (1, 33, 0.5, 8),  # one row, a tile of one column
        (5, 7, 0.0, 4),  # no weights at all
    ],
)
def test_vector_form_matches_dense_for_every_shape(rows, columns, density, codes_count):
    """The vector form this CPU runs (tiled with AVX-512, blocked with AVX2)."""
    weight, dense = csr_weight(rows, columns, density, codes_count, rows, VECTOR_FORM)
    assert np.array_equal(weight.to_dense().numpy(), dense.astype(np.float32))
    assert len(weight.entries()[0]) == np.count_nonzero(dense)
    generator = np.random.default_rng(1)
    for batch in (1, 3, tiled.COLUMN_GROUP, tiled.COLUMN_GROUP + 5, 70):
        inputs = generator.normal(size=(batch, columns)).astype(np.float32)
        expected = inputs @ dense.T
        assert weight.product(inputs).shape == (batch, rows)
        if np.any(expected):
            assert relative_error(weight.product(inputs), expected) < RELATIVE
        else:
            assert not np.any(weight.product(inputs))


@needs_avx512
def test_tiled_form_orders_rows_by_length_and_puts_results_back_in_place():
    """Odd rows nearly full, even rows nearly empty: sorted, each chunk holds rows of one kind,
    and the product still lands on the right rows."""
    rows, columns = 260, 40
    generator = np.random.default_rng(0)
    keep = generator.random((rows, columns)) < np.where(np.arange(rows) % 2, 0.9, 0.05)[:, None]
    codes = np.where(keep, generator.integers(1, 17, (rows, columns)), 0).astype(np.uint8)
    codebook = np.concatenate(([0.0], generator.normal(size=16))).astype(np.float32)
    csr = csr_from_layout(to_sparse(codes, 4, "csr"), int(keep.sum()))
    weight = forms.CodebookWeight(*csr, codebook, (rows, columns), form="tiled")
    assert np.all(weight.storage.order[:130] % 2 == 1) and np.all(weight.storage.order[130:] % 2 == 0)
    dense = codebook[codes].astype(np.float64)
    for batch in (1, 20):
        inputs = generator.normal(size=(batch, columns)).astype(np.float32)
        assert relative_error(weight.product(inputs), inputs @ dense.T) < RELATIVE


@needs_avx512
def test_tiled_form_packs_three_ten_bit_entries_a_word():
    """A hand-made 16 x 64 matrix: row r holds code 1 + r % 31 at column 3 + r (tile 0) and
    code 2 at column 40 (tile 1), row 0 also code 5 at columns 0 and 31."""
    rows, columns = 16, 64
    codes = np.zeros((rows, columns), dtype=np.uint8)
    codes[np.arange(rows), 3 + np.arange(rows)] = 1 + np.arange(rows) % 31
    codes[:, 40] = 2
    codes[0, [0, 31]] = 5
    codebook = np.arange(32, dtype=np.float32)  # code 0 is the zero
    csr = csr_from_layout(to_sparse(codes, 4, "csr"), int(np.count_nonzero(codes)))
    layout = tiled.TiledCodes(*csr, codebook, (rows, columns))
    assert layout.order[0] == 0  # row 0 is the longest
    assert layout.block_tiles.tolist() == [0, 1]  # tile 0: row 0 has 3 entries, one block; tile 1: one
    first = layout.words[layout.order.tolist().index(0)]  # row 0's lane in tile 0's word
    # Row 0 in column order: (column 0, code 5), (column 3, code 1), (column 31, code 5).
    assert [(first >> (10 * k)) & 1023 for k in range(3)] == [0 | 5 << 5, 3 | 1 << 5, 31 | 5 << 5]
    second = layout.words[16 + layout.order.tolist().index(0)]
    assert [(second >> (10 * k)) & 1023 for k in range(3)] == [8 | 2 << 5, 0, 0]  # then padding: code 0
    vector = np.arange(columns, dtype=np.float32)[None, :]
    assert layout.product(vector)[0, 0] == 5 * 0 + 1 * 3 + 5 * 31 + 2 * 40


@needs_avx512
def test_tiled_form_places_padding_on_a_zero_that_is_not_code_zero():
    """A codebook whose zero is entry 7, and full ones with no zero at all."""
    generator = np.random.default_rng(8)
    codebook = generator.normal(size=32).astype(np.float32)
    codebook[7] = 0.0
    codes = np.where(generator.random((20, 50)) < 0.3, generator.integers(8, 32, (20, 50)), 7).astype(np.uint8)
    rows, columns = np.nonzero(codes != 7)
    indptr = np.concatenate(([0], np.cumsum(np.bincount(rows, minlength=20))))
    csr = (indptr, columns.astype(np.uint16), codes[rows, columns])
    weight = forms.CodebookWeight(*csr, codebook, (20, 50), "tiled")
    assert weight.storage.padding_code == 7 and weight.storage.layout == tiled.NARROW
    dense = codebook[codes].astype(np.float64)
    inputs = generator.normal(size=(2, 50)).astype(np.float32)
    assert relative_error(weight.product(inputs), inputs @ dense.T) < RELATIVE
    # 32 entries and no zero: the wide layout, its 33rd slot the padding.
    no_zero = np.linspace(1, 2, 32, dtype=np.float32)
    assert tiled.kernel_table(no_zero)[1:] == (32, tiled.WIDE)
    full = np.linspace(1, 2, 64, dtype=np.float32)
    assert tiled.kernel_table(full) is None
    with pytest.raises(ConfigError, match="at most 64 codebook entries"):
        forms.CodebookWeight(*csr, full, (20, 50), "tiled")
    assert forms.CodebookWeight(*csr, full, (20, 50)).form != "tiled"


@needs_avx512
@pytest.mark.parametrize("codes_count", [33, 64])
def test_tiled_form_wide_layout_holds_six_bit_codes(codes_count):
    """33-64 codebook entries: 11-bit entries, two to a lane, the code looked up in four registers."""
    weight, dense = csr_weight(70, 300, 0.15, codes_count, codes_count, "tiled")
    assert weight.storage.layout == tiled.WIDE and weight.storage.words.dtype == np.uint16
    assert np.array_equal(weight.to_dense().numpy(), dense.astype(np.float32))
    generator = np.random.default_rng(2)
    for batch in (1, 5):
        inputs = generator.normal(size=(batch, 300)).astype(np.float32)
        assert relative_error(weight.product(inputs), inputs @ dense.T) < RELATIVE


def test_which_vector_kernels_numba_can_run_follows_its_target(monkeypatch):
    """The AVX2 form follows numba's rule for the code it generates: NUMBA_CPU_FEATURES on top of
    NUMBA_CPU_NAME's model, no extensions for the generic model, the host's features otherwise
    (a model name alone does not remove them)."""
    monkeypatch.delenv("NUMBA_CPU_FEATURES", raising=False)
    monkeypatch.setenv("NUMBA_CPU_NAME", "generic")
    assert not blocked_avx2.available()
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2,+fma")
    assert blocked_avx2.available()
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2")
    assert not blocked_avx2.available()
    monkeypatch.setenv("NUMBA_CPU_NAME", "haswell")
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "-avx512f")
    assert blocked_avx2.available() and not tiled.available()
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "-avx2")
    assert not blocked_avx2.available()
    monkeypatch.delenv("NUMBA_CPU_FEATURES")
    import llvmlite.binding

    host = llvmlite.binding.get_host_cpu_features()
    assert blocked_avx2.available() == bool(host.get("avx2", False) and host.get("fma", False))


@needs_blocked
def test_a_codebook_over_256_entries_does_not_take_the_blocked_form():
    """A block's code is one byte; the padding needs no zero entry."""
    assert forms.Avx2BlockedCodes.fits(np.arange(1, 257, dtype=np.float32))
    assert not forms.Avx2BlockedCodes.fits(np.arange(257, dtype=np.float32))
    with pytest.raises(ConfigError, match="at most 256"):
        csr_weight(10, 40, 0.3, 300, 1, "blocked")


def blocked_storage(rows, columns, density, codes_count, seed):
    """An Avx2BlockedCodes of random codes (no zero code) with its per-entry form, and the codes."""
    generator = np.random.default_rng(seed)
    kept = generator.random((rows, columns)) < density
    codes = np.where(kept, generator.integers(1, codes_count, (rows, columns)), 0)
    codebook = generator.normal(size=codes_count).astype(np.float32)
    csr = csr_from_layout(to_sparse(codes.astype(np.uint16), 4, "csr"), int((codes > 0).sum()))
    per_entry = forms.PerEntryCodes(*csr, codebook, (rows, columns))
    return blocked_avx2.Avx2BlockedCodes(*csr, codebook, (rows, columns), per_entry), codes


@needs_blocked
def test_the_blocked_form_packs_one_code_a_block_and_runs_batches_per_entry():
    """Lane l of block b is slots[8 b + l]: its row's weight's input column, or the width for
    padding; a chunk's blocks run in code order, all of a block's weights of the block's code.
    The serial and threaded kernels agree; batches of more than one sample run the per-entry
    kernel, with the same result."""
    rows, columns = 27, 40
    storage, codes = blocked_storage(rows, columns, 0.4, 32, 5)
    found = 0
    for chunk in range(len(storage.starts) - 1):
        chunk_codes = storage.block_codes[storage.starts[chunk] : storage.starts[chunk + 1]]
        assert np.all(np.diff(chunk_codes.astype(np.int64)) >= 0)
        for block in range(storage.starts[chunk], storage.starts[chunk + 1]):
            for lane in range(blocked_avx2.LANES):
                column = int(storage.slots[block * blocked_avx2.LANES + lane])
                if chunk * 8 + lane >= rows:
                    assert column == columns
                elif column != columns:
                    assert codes[storage.order[chunk * 8 + lane], column] == storage.block_codes[block]
                    found += 1
    assert found == np.count_nonzero(codes)
    dense = storage.codebook[codes].astype(np.float64)
    dense[codes == 0] = 0.0
    inputs = np.random.default_rng(6).normal(size=(6, columns)).astype(np.float32)
    batched = storage.product(inputs)
    single = np.concatenate([storage.product(inputs[sample : sample + 1]) for sample in range(6)])
    assert relative_error(batched, inputs @ dense.T) < RELATIVE
    assert relative_error(single, inputs @ dense.T) < RELATIVE
    arrays = (storage.slots, storage.block_codes, storage.starts, storage.codebook, storage.order)
    threaded = np.empty(rows, dtype=np.float32)
    blocked_avx2.MATVEC[True](threaded, inputs[0], *arrays)
    assert relative_error(threaded, inputs[0] @ dense.T) < RELATIVE


@needs_blocked
def test_the_blocked_form_takes_inputs_wider_than_sixteen_bits():
    """Past 65,535 columns the padding column no longer fits a uint16: columns are uint32."""
    storage, codes = blocked_storage(3, 70_000, 0.01, 16, 2)
    assert storage.slots.dtype == np.uint32
    dense = storage.codebook[codes].astype(np.float64)
    dense[codes == 0] = 0.0
    inputs = np.random.default_rng(3).normal(size=(1, 70_000)).astype(np.float32)
    assert relative_error(storage.product(inputs), inputs @ dense.T) < RELATIVE


def test_without_a_tiled_form_the_csr_forms_run(monkeypatch):
    """A CPU (or a NUMBA_CPU_NAME / NUMBA_CPU_FEATURES setting) with neither AVX-512F nor AVX2: auto
    mode picks the per-entry CSR form (the documented rule: faster than grouped without AVX-512
    gathers) and never compiles the tiled or blocked kernels; asking for either is a clear error."""
    monkeypatch.delenv(tiled.AVX512_SWITCH, raising=False)
    monkeypatch.setenv("NUMBA_CPU_NAME", "generic")
    assert not tiled.available()
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2,+fma")
    assert not tiled.available()
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2,+avx512f")
    assert tiled.available()
    monkeypatch.setenv(tiled.AVX512_SWITCH, "0")  # the project's own switch wins over the CPU
    assert not tiled.available()
    monkeypatch.setattr(tiled, "available", lambda: False)
    monkeypatch.setattr(blocked_avx2, "available", lambda: False)
    weight, dense = csr_weight(300, 2000, 0.09, 32, 7)
    assert weight.form == "per-entry"
    inputs = np.random.default_rng(0).normal(size=(1, 2000)).astype(np.float32)
    assert relative_error(weight.product(inputs), inputs @ dense.T) < RELATIVE
    for form in ("tiled", "blocked"):
        with pytest.raises(ConfigError, match="runs portable kernels"):
            csr_weight(30, 200, 0.09, 32, 7, form)


@pytest.mark.parametrize("parallel", [False, True])
def test_the_per_entry_matvec_handles_every_row_length(parallel):
    """Four partial sums per row, then a remainder: rows of 0 to 9 entries and a long one, against
    a float64 product."""
    from deepshrink.runtime.kernels import MATVEC

    generator = np.random.default_rng(3)
    lengths = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 37, 1]
    indptr = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    columns = np.concatenate([np.sort(generator.choice(50, length, replace=False)) for length in lengths])
    codes = generator.integers(1, 16, len(columns)).astype(np.uint8)
    codebook = generator.normal(size=16).astype(np.float32)
    vector = generator.normal(size=50).astype(np.float32)
    out = np.empty(len(lengths), dtype=np.float32)
    MATVEC[parallel](indptr, columns.astype(np.uint16), codes, codebook, vector, out)
    dense = np.zeros((len(lengths), 50))
    rows = np.repeat(np.arange(len(lengths)), lengths)
    dense[rows, columns] = codebook[codes]
    assert relative_error(out, dense @ vector.astype(np.float64)) < RELATIVE


def test_an_unknown_form_is_a_clear_error():
    with pytest.raises(ConfigError, match="should be one of tiled, blocked, grouped, per-entry"):
        csr_weight(4, 4, 0.5, 4, 0, "fast")


class ConvNet(nn.Module):
    """Convolutions with stride, padding and dilation, then fully connected layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=2, dilation=2, bias=False)
        self.fc1 = nn.Linear(16 * 14 * 14, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.conv2(torch.relu(self.conv1(inputs))))
        return self.fc2(torch.relu(self.fc1(hidden.flatten(1))))


def compressed_file(tmp_path, model: nn.Module, sparsities: dict[str, float], bits: dict[str, int]):
    torch.manual_seed(0)
    layers = dict(model.named_modules())
    apply_masks(model, {name: sparsity_mask(layers[name].weight, value) for name, value in sparsities.items()})
    share_weights(model, bits)
    path = save_compressed(model, tmp_path / "model.dcz", model_name="convnet")
    return path


@pytest.fixture
def convnet_file(tmp_path):
    torch.manual_seed(0)
    return compressed_file(
        tmp_path, ConvNet(), {"conv1": 0.5, "conv2": 0.8, "fc1": 0.95, "fc2": 0.7}, {"conv*": 8, "fc*": 5}
    )


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize(
    "conv_bits",
    [8, pytest.param(5, marks=needs_vector_form), pytest.param(6, marks=needs_avx512)],
    ids=["conv-8-bit", "conv-5-bit", "conv-6-bit-tiled-wide"],
)
def test_compressed_model_matches_the_decoded_dense_model(tmp_path, batch, conv_bits):
    """Convolutions with stride, padding and dilation through each kind of form: 8-bit codebooks
    run from CSR (or blocked, with AVX2), 5- and 6-bit ones from register tiles (narrow and wide
    layouts) or blocked."""
    torch.manual_seed(0)
    sparsities = {"conv1": 0.5, "conv2": 0.8, "fc1": 0.95, "fc2": 0.7}
    path = compressed_file(tmp_path, ConvNet(), sparsities, {"conv*": conv_bits, "fc*": 5})
    reference = ConvNet()
    reference.load_state_dict(load_compressed_state(path))
    running = load_runtime(path, ConvNet(), mode="sparse")
    assert isinstance(running.conv1, CompressedConv2d) and isinstance(running.conv2, CompressedConv2d)
    assert isinstance(running.fc1, CompressedLinear) and isinstance(running.fc2, CompressedLinear)
    # 256 codes: one code per entry with AVX-512 (grouping is over 2x larger for this small
    # layer); with AVX2 the blocked form wherever it is not over 2x larger either.
    weight_form = running.conv2.weight_form
    if vector_form_fits(weight_form.storage.codebook):
        vector, per_entry = (rebuilt(weight_form, form) for form in (VECTOR_FORM, "per-entry"))
        smaller = own_bytes(vector) <= forms.SIZE_LIMIT * per_entry.nbytes
        assert weight_form.form == (VECTOR_FORM if smaller else "per-entry")
    else:
        assert weight_form.form == "per-entry"
    inputs = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        assert relative_error(running(inputs), reference(inputs)) < RELATIVE
        for name in ("conv1", "conv2"):
            layer_input = torch.randn(batch, getattr(reference, name).in_channels, 12, 9)
            expected = getattr(reference, name)(layer_input)
            assert relative_error(getattr(running, name)(layer_input), expected) < RELATIVE


def load_compressed_state(path):
    from deepshrink.compressed import read_state_dict

    return read_state_dict(path)[0]


def assert_fastest_measured(layer: nn.Module) -> bool:
    """An auto-mode layer runs, in each batch range, the kind measured fastest at load; a plain
    nn.Linear / nn.Conv2d only where dense was fastest in every range."""
    if type(layer) in (nn.Linear, nn.Conv2d):
        return True
    assert isinstance(layer, CompressedLinear | CompressedConv2d)
    choice = layer.choice
    assert choice.seconds, "auto mode measures"
    kinds = KINDS if isinstance(layer, CompressedLinear) else ("compressed", "dense")
    assert {kind for kind, _ in choice.seconds} == set(kinds)
    batches = sorted({batch for _, batch in choice.seconds})  # one per range, as timed (representative_batch)
    for plan, batch in zip(choice.plans, batches, strict=True):
        assert choice.seconds[(plan, batch)] == min(choice.seconds[(kind, batch)] for kind in kinds)
    assert not choice.all_dense
    assert (choice.dense is not None) == ("dense" in choice.plans)
    assert (choice.csr is not None) == ("csr" in choice.plans)
    return True


def test_range_of_follows_the_batch_ranges():
    for batch in range(1, 200):
        expected = next(index for index, (largest, _) in enumerate(BATCH_RANGES) if largest is None or batch <= largest)
        assert range_of(batch) == expected


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 5, 40])
def test_every_kind_of_product_computes_the_same_layer(kind, batch):
    """Whichever product a batch range runs (compressed, torch CSR, dense), the layer's output is
    the decoded dense layer's, bias included, for every batch range and leading shape."""
    codes, codebook = random_codes(48, 200, 0.1, 5)
    csr = csr_from_layout(to_sparse(codes, 5, "csr"), int(np.count_nonzero(codes)))
    weight = forms.CodebookWeight(*csr, codebook, (48, 200))
    bias = torch.randn(48)
    layer = CompressedLinear(weight, bias, fixed_choice(kind, weight))
    inputs = torch.randn(batch, 3, 200)
    expected = inputs.double() @ weight.to_dense().double().T + bias.double()
    with torch.no_grad():
        assert relative_error(layer(inputs), expected) < RELATIVE
    assert layer.resident_bytes >= weight.nbytes


@pytest.mark.parametrize("form", forms.FORMS)
def test_a_single_sample_runs_one_call_from_the_tensor_and_others_take_the_general_path(form, monkeypatch):
    """Batch 1 reads a contiguous float32 tensor by address (one numba call, bias added in it);
    a strided view, another dtype, another leading shape or a tensor that requires a gradient
    gives the same values by the general path, and an offset into a larger storage is honoured."""
    if not {"tiled": tiled.available, "blocked": blocked_avx2.available}.get(form, lambda: True)():
        pytest.skip(f"no {form} kernels on this CPU")
    weight, dense = csr_weight(40, 300, 0.1, 32, 5, form)
    bias = torch.randn(40)
    wide = torch.randn(3, 700)
    for layer_bias in (bias, None):
        layer = CompressedLinear(weight, layer_bias)
        expected_bias = 0.0 if layer_bias is None else layer_bias.double().numpy()

        def expected(inputs, expected_bias=expected_bias):
            return inputs.detach().double().reshape(-1, 300).numpy() @ dense.T + expected_bias

        with monkeypatch.context() as patch:  # the single-sample path never reaches the form's product
            patch.setattr(weight, "product", lambda inputs: pytest.fail("batch 1 took the general path"))
            for single in (wide[:1, :300].clone(), wide[1, 17:317].unsqueeze(0)):  # the second: an offset
                assert single.is_contiguous()
                assert relative_error(layer(single), expected(single)) < RELATIVE
        for other in (
            wide[:1, ::2][:, :300],  # strided
            wide[:1, :300].double(),
            wide[:1, :300].reshape(1, 1, 300),
            wide[:1, :300].clone().requires_grad_(),
        ):
            output = layer(other)
            assert relative_error(output, expected(other).reshape(output.shape)) < RELATIVE


@pytest.mark.parametrize("kind", ["compressed", "dense"])
def test_a_convolution_computes_the_same_by_either_product(kind):
    like = nn.Conv2d(6, 8, 3, stride=2, padding=1)
    codes, codebook = random_codes(8, 6 * 9, 0.3, 4)
    csr = csr_from_layout(to_sparse(codes, 5, "csr"), int(np.count_nonzero(codes)))
    weight = forms.CodebookWeight(*csr, codebook, (8, 54))
    layer = CompressedConv2d(weight, like.bias, like, fixed_choice(kind, weight, tuple(like.weight.shape)))
    inputs = torch.randn(3, 6, 11, 11)
    expected = functional.conv2d(
        inputs.double(), weight.to_dense().reshape(like.weight.shape).double(), like.bias.double(), 2, 1
    )
    with torch.no_grad():
        assert relative_error(layer(inputs), expected) < RELATIVE


def test_auto_selection_picks_dense_for_a_dense_layer_and_can_be_overridden(tmp_path):
    torch.manual_seed(0)
    path = compressed_file(tmp_path, ConvNet(), {"fc1": 0.95}, {"conv*": 8, "fc*": 5})
    running = load_runtime(path, ConvNet())
    assert_fastest_measured(running.fc1)  # 5% dense: measured; compressed where it was fastest
    assert type(running.fc2) is nn.Linear and type(running.conv1) is nn.Conv2d  # fully dense: dense wins
    forced = load_runtime(path, ConvNet(), mode={"*": "dense", "fc2": "sparse"})
    assert type(forced.fc1) is nn.Linear and isinstance(forced.fc2, CompressedLinear)
    dense_state = load_compressed_state(path)
    assert torch.equal(forced.fc1.weight, dense_state["fc1.weight"])


def test_running_compressed_never_builds_the_dense_weights(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4096, 2048), nn.ReLU(), nn.Linear(2048, 10))
    path = compressed_file(tmp_path, model, {"1": 0.91}, {"*": 5})
    factory = copy.deepcopy(nn.Sequential(nn.Flatten(), nn.Linear(4096, 2048), nn.ReLU(), nn.Linear(2048, 10)))

    def forbidden(*arguments, **keywords):
        raise AssertionError("the dense weights were built")

    monkeypatch.setattr(forms.CodebookWeight, "to_dense", forbidden)
    monkeypatch.setattr(codec, "values_from_sparse", forbidden)
    tracemalloc.start()
    running = load_runtime(path, factory, mode="sparse")
    inputs = torch.randn(1, 4096)
    with torch.no_grad():
        running(inputs)  # compile the kernels first: the compiler's own memory is not the layer's
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]  # the compressed form itself, loaded under tracing
    with torch.no_grad():
        running(inputs)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    dense_bytes = 4096 * 2048 * 4
    # 9% kept: one code per entry is 13% of the dense bytes; the AVX2 blocked form keeps those
    # arrays for batches and its blocks for single samples, about 27% together.
    assert before < dense_bytes / 3
    assert peak - before < dense_bytes / 100
    resident = resident_weight_bytes(running)
    assert resident["1"] < dense_bytes / 3


def test_a_file_whose_nonzero_count_lies_is_refused(convnet_file, tmp_path):
    from deepshrink.encode import container

    loaded = container.read(convnet_file)
    for record in loaded.header["tensors"]:
        if record["name"] == "fc1.weight":
            record["nonzeros"] += 1
    bad = container.write(tmp_path / "bad.dcz", loaded.header, loaded.buffers)
    from deepshrink.errors import FormatError

    with pytest.raises(FormatError, match="non-zero"):
        load_runtime(bad, ConvNet(), mode="sparse")


def test_inputs_on_another_device_are_a_clear_error(convnet_file):
    running = load_runtime(convnet_file, ConvNet(), mode="sparse")
    with pytest.raises(ModelError, match="CPU"):
        running.fc2(torch.randn(1, 64, device="meta"))


def test_registered_model_loads_by_the_name_in_the_file(tmp_path):
    from deepshrink.models import build_model

    torch.manual_seed(0)
    model = build_model("lenet-5")
    layers = dict(model.named_modules())
    apply_masks(model, {name: sparsity_mask(layers[name].weight, 0.9) for name in ("conv2", "fc1")})
    share_weights(model)
    path = save_compressed(model, tmp_path / "lenet5.dcz", model_name="lenet-5")
    running = load_runtime(path)
    decoded, _ = load_compressed(path)
    inputs = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert relative_error(running(inputs), decoded(inputs)) < RELATIVE
    # Auto mode: fc1 (1.6 MB, 10% dense) measured; conv2 dense, faster than im2col here.
    assert_fastest_measured(running.fc1) and type(running.conv2) is nn.Conv2d
    forced = load_runtime(path, mode={"*": "auto", "conv2": "sparse"})
    assert isinstance(forced.conv2, CompressedConv2d)
    with torch.no_grad():
        assert relative_error(forced(inputs), decoded(inputs)) < RELATIVE
    # Given the input size, auto mode times the convolutions on it too.
    measured = load_runtime(path, input_shape=(1, 28, 28))
    assert type(measured.conv1) is nn.Conv2d  # not pruned: its compressed form is not smaller
    assert_fastest_measured(measured.conv2)
    with torch.no_grad():
        for batch in (1, 5, 20):
            batch_inputs = torch.randn(batch, 1, 28, 28)
            assert relative_error(measured(batch_inputs), decoded(batch_inputs)) < RELATIVE
    with pytest.raises(ConfigError, match="input shape 3 3 does not fit"):
        load_runtime(path, input_shape=(3, 3))


def test_predict_and_bench_commands(cli, tmp_path):
    """`predict` prints the accuracy the dense decoding has; `bench` times both in one run."""
    import re

    from deepshrink.data import load_data, make_loader
    from deepshrink.models import build_model
    from deepshrink.train import TrainConfig, evaluate, fit

    data = load_data(train_subset=2000)
    torch.manual_seed(0)
    model = build_model("lenet-300-100")
    fit(model, make_loader(data.train, 128, shuffle=True), TrainConfig(epochs=1), progress=False)
    layers = dict(model.named_modules())
    apply_masks(model, {name: sparsity_mask(layers[name].weight, 0.9) for name in ("fc1", "fc2")})
    share_weights(model, {"fc*": 5})
    path = save_compressed(model, tmp_path / "mlp.dcz", model_name="lenet-300-100")
    decoded, _ = load_compressed(path)
    expected = evaluate(decoded, make_loader(data.test, 1000, shuffle=False)).metric

    predicted = cli("predict", str(path), "--batch-size", "100")
    assert predicted.returncode == 0, predicted.stderr
    assert float(re.search(r"test top-1 accuracy ([0-9.]+)", predicted.stdout).group(1)) == round(expected, 4)
    bench = cli("bench", str(path), "--batch", "1", "8", "--repeats", "5", "--layers", "--input-shape", "1", "28", "28")
    assert bench.returncode == 0, bench.stderr
    # --layers: each layer alone, every weight layer compressed (fc3, dense in auto mode, too).
    for layer in ("fc1", "fc2", "fc3"):
        assert re.search(rf"^{layer}\s+[a-z-]+\s+[\d.]+\s+[\d.]+\s+[\d.]+x$", bench.stdout, re.M), bench.stdout
    assert re.search(r"^1\s+[\d.]+\s+[\d.]+\s+[\d.]+x$", bench.stdout, re.M)
    # How fc1 runs is measured on this machine at load (compressed in some form, torch's CSR or
    # dense, per batch range), not one fixed name: the residency table says which.
    assert re.search(r"^fc1\s+(CompressedLinear|Linear)\s+940,800\s+[\d,]+\s+[a-z/-]+\s*$", bench.stdout, re.M), (
        bench.stdout
    )
    bad = cli("predict", str(path), "--mode", "fc*=fast")
    assert bad.returncode == 3 and "should be one of auto, sparse, dense" in bad.stderr


def test_prefetch_hint_leaves_results_alone_and_rejects_non_arrays():
    import numba

    from deepshrink.runtime.intrinsics import prefetch

    @numba.njit
    def total(values):
        result = 0
        for index in range(len(values)):
            prefetch(values, min(index + 64, len(values) - 1))
            result += values[index]
        return result

    values = np.arange(1000, dtype=np.uint16)
    assert total(values) == int(values.astype(np.int64).sum())

    @numba.njit
    def misuse(number):
        prefetch(number, 0)

    with pytest.raises(numba.core.errors.TypingError):
        misuse(3.0)


def test_the_smaller_form_is_kept_when_not_forced():
    """Padding can outgrow one code per entry in a small layer with many codes; auto mode then
    gives up a faster form. The rule: with AVX-512, tiled (up to 64 codes), else grouped, else
    per entry; with AVX2, blocked, else per entry; each only while its own arrays are at most
    SIZE_LIMIT times the per-entry form's."""

    def automatic_and_expected(rows, columns, codes_count):
        automatic, per_entry = (
            csr_weight(rows, columns, 0.35, codes_count, 5, form)[0] for form in (None, "per-entry")
        )
        limit = forms.SIZE_LIMIT * per_entry.nbytes
        candidates = []
        if vector_form_fits(np.zeros(codes_count, dtype=np.float32)):
            candidates.append(VECTOR_FORM)
        if tiled.available() and codes_count <= 256:
            candidates.append("grouped")
        for form in candidates:
            if own_bytes(csr_weight(rows, columns, 0.35, codes_count, 5, form)[0]) <= limit:
                return automatic.form, form
        return automatic.form, "per-entry"

    chosen, expected = automatic_and_expected(32, 16, 64)  # like SqueezeNet's fire2.expand1x1
    assert chosen == expected
    grouped, per_entry = (csr_weight(32, 16, 0.35, 64, 5, form)[0] for form in ("grouped", "per-entry"))
    assert grouped.nbytes > forms.SIZE_LIMIT * per_entry.nbytes
    chosen, expected = automatic_and_expected(300, 2000, 16)
    assert chosen == expected == (VECTOR_FORM or "per-entry")
    chosen, expected = automatic_and_expected(300, 2000, 100)
    assert chosen == expected == {"tiled": "grouped", "blocked": "blocked", None: "per-entry"}[VECTOR_FORM]


@needs_vector_form
def test_a_very_sparse_layer_does_not_take_the_vector_form():
    """At 0.5% density nearly every (chunk, tile) word of the tiled form is padding, and with 256
    codes nearly every blocked block: far larger than one code per entry."""
    codes_count = 32 if VECTOR_FORM == "tiled" else 256
    weight, _ = csr_weight(512, 4096, 0.005, codes_count, 9)
    vector_weight, _ = csr_weight(512, 4096, 0.005, codes_count, 9, VECTOR_FORM)
    per_entry, _ = csr_weight(512, 4096, 0.005, codes_count, 9, "per-entry")
    assert own_bytes(vector_weight) > forms.SIZE_LIMIT * per_entry.nbytes
    assert weight.form == "per-entry" and weight.nbytes == per_entry.nbytes


def test_auto_mode_measures_only_layers_that_are_sparse_and_smaller():
    from deepshrink.runtime.load import _may_run_compressed

    linear = nn.Linear(1, 1)
    tiny = forms.CodebookWeight(
        np.array([0, 1, 1, 2, 2]),
        np.array([0, 3], np.uint16),
        np.array([1, 2], np.uint8),
        np.linspace(-1, 1, 32, dtype=np.float32),
        (4, 4),
    )
    assert tiny.density <= 0.35 and tiny.nbytes >= 4 * 4 * 4
    assert not _may_run_compressed(tiny, linear, 0.35)  # not smaller
    codes, codebook = random_codes(200, 800, 0.09, 5)
    csr = csr_from_layout(to_sparse(codes, 4, "csr"), int(np.count_nonzero(codes)))
    large = forms.CodebookWeight(*csr, codebook, (200, 800))
    assert _may_run_compressed(large, linear, 0.35) and not _may_run_compressed(large, linear, 0.05)
    assert not _may_run_compressed(large, nn.Conv2d(8, 200, 10), 0.35)  # convolutions run dense
    choice = measure_linear(large)
    assert len(choice.plans) == len(BATCH_RANGES) and set(choice.plans) <= set(KINDS)
    if not choice.all_dense:
        assert_fastest_measured(CompressedLinear(large, None, choice))


def test_the_two_fastest_kinds_are_timed_again_when_close(monkeypatch):
    """Within CLOSE of each other, the two fastest kinds get MORE_ROUNDS more rounds each; a
    kind far behind gets only the first ROUNDS; ties go to the earlier kind."""
    from collections import Counter

    from deepshrink.runtime import choice

    speeds = {"compressed": 1.05, "csr": 1.0, "dense": 2.0}
    called, timed = [], Counter()
    layers = {kind: (lambda inputs, kind=kind: called.append(kind)) for kind in speeds}

    def fake_median_seconds(function, repeats, warmup=0):
        function()
        timed[called[-1]] += 1
        return speeds[called[-1]]

    monkeypatch.setattr(choice, "median_seconds", fake_median_seconds)
    measured = choice._measure(layers, (4,))
    ranges = len(BATCH_RANGES)
    more = choice.ROUNDS + choice.MORE_ROUNDS
    assert timed == {"compressed": ranges * more, "csr": ranges * more, "dense": ranges * choice.ROUNDS}
    assert measured.plans == ("csr",) * ranges
    speeds["compressed"] = 1.2  # not close: no more rounds
    timed.clear()
    assert choice._measure(layers, (4,)).plans == ("csr",) * ranges
    assert set(timed.values()) == {ranges * choice.ROUNDS}


def test_a_kind_far_behind_on_long_calls_is_out_after_its_sizing_call():
    """Where a call takes LONG_CALL_SECONDS or more, a kind over DECISIVE times the fastest on
    its sizing call is not timed in rounds: one warm-up call and one sizing call a range (a
    ResNet-18's compressed convolutions through im2col were timed 19 times a range before).
    The kinds within DECISIVE are timed in rounds as before."""
    from collections import Counter

    from deepshrink.runtime import choice

    pause = {"compressed": 12 * choice.LONG_CALL_SECONDS, "csr": 1.1 * choice.LONG_CALL_SECONDS}
    pause["dense"] = choice.LONG_CALL_SECONDS
    called = Counter()

    def layer(kind):
        def call(inputs):
            called[kind] += 1
            time.sleep(pause[kind])

        return call

    measured = choice._measure({kind: layer(kind) for kind in pause}, (4,))
    ranges = len(BATCH_RANGES)
    assert called["compressed"] == 2 * ranges
    assert called["dense"] > 2 * ranges + choice.ROUNDS and called["csr"] > 2 * ranges + choice.ROUNDS
    assert set(measured.plans) <= {"csr", "dense"}
    for _, batch in BATCH_RANGES:
        assert measured.seconds[("compressed", batch)] >= 12 * choice.LONG_CALL_SECONDS


def test_the_large_batch_range_is_timed_on_fewer_examples_of_a_large_input():
    from deepshrink.runtime.choice import LARGE_BATCH_ELEMENTS, representative_batch

    assert [representative_batch(nominal, (784,)) for _, nominal in BATCH_RANGES] == [1, 8, 64]
    assert representative_batch(64, (64, 56, 56)) == LARGE_BATCH_ELEMENTS // (64 * 56 * 56) == 20
    assert representative_batch(64, (3, 512, 512)) == 17  # never below the large range's least
    assert representative_batch(8, (3, 512, 512)) == 8


@pytest.mark.parametrize("index_type", [np.uint16, np.int32])
def test_gathered_sum_matches_numpy(index_type):
    import numba

    from deepshrink.runtime.intrinsics import GATHER_WIDTH, gathered_sum

    @numba.njit
    def run(vector, columns, start, blocks):
        return gathered_sum(vector, columns, start, blocks)

    generator = np.random.default_rng(4)
    vector = generator.normal(size=5000).astype(np.float32)
    columns = generator.integers(0, 5000, 10 * GATHER_WIDTH).astype(index_type)
    for start, blocks in ((0, 10), (3 * GATHER_WIDTH, 4), (7, 2), (0, 0)):
        expected = vector[columns[start : start + blocks * GATHER_WIDTH].astype(np.int64)].astype(np.float64).sum()
        assert run(vector, columns, start, blocks) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    with pytest.raises(numba.core.errors.TypingError):  # a strided view: lanes would read wrong addresses
        run(vector[::2], columns, 0, 1)


@pytest.mark.parametrize("index_type", [np.uint16, np.int32])
def test_add_rows_matches_numpy_for_every_batch_width(index_type):
    """Batches narrower than, equal to and wider than a vector, with a masked last chunk."""
    import numba

    from deepshrink.runtime.intrinsics import GATHER_WIDTH, add_rows

    @numba.njit
    def run(total, inputs, columns, start, count):
        add_rows(total, inputs, columns, start, count)

    generator = np.random.default_rng(5)
    for batch in (1, 7, GATHER_WIDTH, GATHER_WIDTH + 1, 4 * GATHER_WIDTH, 70):
        inputs = generator.normal(size=(300, batch)).astype(np.float32)
        columns = generator.integers(0, 300, 400).astype(index_type)
        for start, count in ((0, 400), (13, 100), (5, 0)):
            total = generator.normal(size=batch).astype(np.float32)
            expected = total + inputs[columns[start : start + count].astype(np.int64)].sum(axis=0)
            run(total, inputs, columns, start, count)
            np.testing.assert_allclose(total, expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(numba.core.errors.TypingError):  # a column slice is not row-major
        run(np.zeros(2, np.float32), inputs[:, :2], columns, 0, 1)


def test_add_weighted_rows_matches_numpy():
    import numba

    from deepshrink.runtime.intrinsics import GATHER_WIDTH, add_weighted_rows

    @numba.njit
    def run(total, inputs, columns, codes, codebook, start, count):
        add_weighted_rows(total, inputs, columns, codes, codebook, start, count)

    generator = np.random.default_rng(6)
    codebook = generator.normal(size=40).astype(np.float32)
    for batch in (1, GATHER_WIDTH - 1, 2 * GATHER_WIDTH + 3):
        inputs = generator.normal(size=(200, batch)).astype(np.float32)
        columns = generator.integers(0, 200, 300).astype(np.uint16)
        codes = generator.integers(0, 40, 300).astype(np.uint8)
        total = np.zeros(batch, np.float32)
        run(total, inputs, columns, codes, codebook, 11, 250)
        span = slice(11, 261)
        expected = (codebook[codes[span]][:, None] * inputs[columns[span].astype(np.int64)]).sum(axis=0)
        np.testing.assert_allclose(total, expected, rtol=1e-5, atol=1e-4)


def test_layers_alike_are_measured_once_and_run_as_measured(tmp_path, monkeypatch):
    """Auto mode times one of each kind of layer (shape, form, density to 1%): the second of two
    alike layers gets the first's plans, with its own torch forms, and computes its own product."""
    from deepshrink.runtime import load as runtime_load

    torch.manual_seed(0)

    def network():
        return nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
            nn.Linear(512, 10),
        )  # fmt: skip

    timed = []
    original = runtime_load.measure_linear

    def counting(weight, *arguments, **keywords):
        timed.append(weight.density)
        return original(weight, *arguments, **keywords)

    monkeypatch.setattr(runtime_load, "measure_linear", counting)
    path = compressed_file(tmp_path, network(), {"0": 0.9, "2": 0.9, "4": 0.7, "6": 0.5}, {"*": 5})
    running = load_runtime(path, network())
    assert len(timed) == 2  # 0 and 2 alike (10% kept), 4 (30%); 6 (10 x 512) is too small to run compressed
    first, second = running[0], running[2]
    assert type(first) is type(second)  # a plain Linear both where dense won every range
    if isinstance(first, CompressedLinear):
        assert second.choice.plans == first.choice.plans and not second.choice.seconds
        for layer in (first, second):
            assert (layer.choice.dense is not None) == ("dense" in layer.choice.plans)
            assert (layer.choice.csr is not None) == ("csr" in layer.choice.plans)
    decoded = load_compressed_state(path)
    inputs = torch.randn(8, 512)
    with torch.no_grad():
        for position in (0, 2, 4):
            expected = functional.linear(inputs, decoded[f"{position}.weight"], decoded[f"{position}.bias"])
            for batch in (inputs[:1], inputs):
                assert relative_error(running[position](batch), expected[: len(batch)]) < 1e-5
