"""Running from the compressed form: codebook CSR kernels and layers against dense torch."""

from __future__ import annotations

import copy
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
from deepshrink.runtime import forms, tiled, tiled_avx2
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
needs_tiled = pytest.mark.skipif(
    not (tiled.available() or tiled_avx2.available()), reason="the tiled form's kernels need AVX-512F or AVX2"
)


def tiled_bytes(weight) -> int:
    """What the tiled form adds: its tiles (the AVX2 form also keeps the per-entry arrays, for
    batches); one code per entry's bytes for any other form."""
    return getattr(weight.storage, "tiles_nbytes", weight.nbytes)


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
        pytest.param(32, "tiled", marks=needs_tiled),
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
    where chance puts them: each form that applies on this machine (the tiled form its CPU's
    kernels run, whichever of AVX-512 or AVX2) against a float64 dense product."""
    codes_count = max(2, 2**bits)
    generator = np.random.default_rng(seed)
    inputs = generator.normal(size=(batch, columns)).astype(np.float32)
    for form in forms.FORMS:
        if form == "tiled" and forms._tiled_form(np.zeros(codes_count, dtype=np.float32)) is None:
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


@needs_tiled
@pytest.mark.parametrize(
    ("rows", "columns", "density", "codes_count"),
    [
        (37, 1000, 0.05, 32),  # rows not a multiple of 16 (or 8): the last chunk has empty lanes
        (8, 8, 1.0, 32),  # one full AVX2 tile: every step of every lane is a weight
        (16, 32, 1.0, 32),  # one full tile: every step of every lane is a weight
        (100, 31, 0.3, 31),  # fewer columns than a tile; 31 entries leave a zero slot for padding
        (1, 33, 0.5, 8),  # one row, a tile of one column
        (5, 7, 0.0, 4),  # no weights at all
    ],
)
def test_tiled_form_matches_dense_for_every_shape(rows, columns, density, codes_count):
    weight, dense = csr_weight(rows, columns, density, codes_count, rows, "tiled")
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


def test_which_tiled_kernels_numba_can_run_follows_its_target(monkeypatch):
    """The AVX2 form follows numba's rule for the code it generates: NUMBA_CPU_FEATURES on top of
    NUMBA_CPU_NAME's model, no extensions for the generic model, the host's features otherwise
    (a model name alone does not remove them)."""
    monkeypatch.delenv("NUMBA_CPU_FEATURES", raising=False)
    monkeypatch.setenv("NUMBA_CPU_NAME", "generic")
    assert not tiled_avx2.available()
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2,+fma")
    assert tiled_avx2.available()
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2")
    assert not tiled_avx2.available()
    monkeypatch.setenv("NUMBA_CPU_NAME", "haswell")
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "-avx512f")
    assert tiled_avx2.available() and not tiled.available()
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "-avx2")
    assert not tiled_avx2.available()
    monkeypatch.delenv("NUMBA_CPU_FEATURES")
    import llvmlite.binding

    host = llvmlite.binding.get_host_cpu_features()
    assert tiled_avx2.available() == bool(host.get("avx2", False) and host.get("fma", False))


def test_a_codebook_over_32_entries_does_not_take_the_avx2_form():
    assert tiled_avx2.kernel_table(np.arange(31, dtype=np.float32))[1] == 0
    assert tiled_avx2.kernel_table(np.arange(1, 32, dtype=np.float32))[1] == 31  # a zero slot added
    assert tiled_avx2.kernel_table(np.arange(1, 33, dtype=np.float32)) is None  # no slot for padding
    assert tiled_avx2.kernel_table(np.arange(33, dtype=np.float32)) is None


@pytest.mark.skipif(not tiled_avx2.available(), reason="the AVX2 tiled form needs AVX2 and FMA")
def test_the_avx2_form_packs_four_blocks_a_word_and_runs_batches_per_entry():
    """Block b's entry for lane l is byte b % 4 of word (b // 4) * 8 + l: column in the tile in
    the low 3 bits, the code above; each chunk has a multiple of four blocks. Batches of more
    than one sample run the per-entry kernel, with the same result."""
    rows, columns = 11, 20
    generator = np.random.default_rng(5)
    codes = np.where(generator.random((rows, columns)) < 0.4, generator.integers(1, 32, (rows, columns)), 0)
    codebook = np.concatenate(([0.0], generator.normal(size=31))).astype(np.float32)
    indptr, indices, entry_codes = csr_from_layout(to_sparse(codes.astype(np.uint16), 5, "csr"), int((codes > 0).sum()))
    per_entry = forms.PerEntryCodes(indptr, indices, entry_codes, codebook, (rows, columns))
    storage = tiled_avx2.Avx2TiledCodes(indptr, indices, entry_codes, codebook, (rows, columns), per_entry)
    assert np.all(np.diff(storage.starts) % tiled_avx2.BLOCKS_PER_WORD == 0)
    found = 0
    for chunk in range(len(storage.starts) - 1):
        for block in range(storage.starts[chunk], storage.starts[chunk + 1]):
            for lane in range(tiled_avx2.LANES):
                word = int(storage.words[block // 4 * tiled_avx2.LANES + lane])
                entry = (word >> (8 * (block % 4))) & 0xFF
                if entry >> 3 == storage.padding_code or chunk * 8 + lane >= rows:
                    continue
                row, column = storage.order[chunk * 8 + lane], storage.block_tiles[block] * 8 + (entry & 7)
                assert codes[row, column] == entry >> 3
                found += 1
    assert found == np.count_nonzero(codes)
    dense = codebook[codes].astype(np.float64)
    inputs = generator.normal(size=(6, columns)).astype(np.float32)
    batched = storage.product(inputs)
    single = np.concatenate([storage.product(inputs[sample : sample + 1]) for sample in range(6)])
    assert relative_error(batched, inputs @ dense.T) < RELATIVE
    assert relative_error(single, inputs @ dense.T) < RELATIVE


def test_without_a_tiled_form_the_csr_forms_run(monkeypatch):
    """A CPU (or a NUMBA_CPU_NAME / NUMBA_CPU_FEATURES setting) with neither AVX-512F nor AVX2: auto
    mode picks the per-entry CSR form (the documented rule: faster than grouped without AVX-512
    gathers) and never compiles the tiled kernels; asking for the tiled form is a clear error."""
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
    monkeypatch.setattr(tiled_avx2, "available", lambda: False)
    weight, dense = csr_weight(300, 2000, 0.09, 32, 7)
    assert weight.form == "per-entry"
    inputs = np.random.default_rng(0).normal(size=(1, 2000)).astype(np.float32)
    assert relative_error(weight.product(inputs), inputs @ dense.T) < RELATIVE
    with pytest.raises(ConfigError, match="runs portable kernels"):
        csr_weight(30, 200, 0.09, 32, 7, "tiled")


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
    with pytest.raises(ConfigError, match="should be one of tiled, grouped, per-entry"):
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
    [8, pytest.param(5, marks=needs_tiled), pytest.param(6, marks=needs_avx512)],
    ids=["conv-8-bit-csr", "conv-5-bit-tiled", "conv-6-bit-tiled-wide"],
)
def test_compressed_model_matches_the_decoded_dense_model(tmp_path, batch, conv_bits):
    """Convolutions with stride, padding and dilation through each kind of form: 8-bit codebooks
    run from CSR, 5- and 6-bit ones from register tiles (narrow and wide layouts)."""
    torch.manual_seed(0)
    sparsities = {"conv1": 0.5, "conv2": 0.8, "fc1": 0.95, "fc2": 0.7}
    path = compressed_file(tmp_path, ConvNet(), sparsities, {"conv*": conv_bits, "fc*": 5})
    reference = ConvNet()
    reference.load_state_dict(load_compressed_state(path))
    running = load_runtime(path, ConvNet(), mode="sparse")
    assert isinstance(running.conv1, CompressedConv2d) and isinstance(running.conv2, CompressedConv2d)
    assert isinstance(running.fc1, CompressedLinear) and isinstance(running.fc2, CompressedLinear)
    # 256 codes: CSR (one code per entry for this small layer, where grouping is over 2x larger).
    codebook = running.conv2.weight_form.storage.codebook
    tiled_fits = forms._tiled_form(codebook) is not None
    assert running.conv2.weight_form.form == ("tiled" if conv_bits != 8 and tiled_fits else "per-entry")
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
    for plan, (_, batch) in zip(choice.plans, BATCH_RANGES, strict=True):
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
    if form == "tiled" and forms._tiled_form(np.zeros(32, dtype=np.float32)) is None:
        pytest.skip("no tiled kernels on this CPU")
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
    # 9% kept: one code per entry is 13% of the dense bytes; the AVX2 tiled form keeps those
    # arrays for batches and its tiles for single samples, 24% together.
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


def test_predict_and_bench_commands(tmp_path):
    """`predict` prints the accuracy the dense decoding has; `bench` times both in one run."""
    import re
    import subprocess
    import sys

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

    def run(*arguments):
        return subprocess.run(
            [sys.executable, "-m", "deepshrink", "--quiet", *arguments], capture_output=True, text=True, timeout=300
        )

    predicted = run("predict", str(path), "--batch-size", "100")
    assert predicted.returncode == 0, predicted.stderr
    assert float(re.search(r"test top-1 accuracy ([0-9.]+)", predicted.stdout).group(1)) == round(expected, 4)
    bench = run("bench", str(path), "--batch", "1", "8", "--repeats", "5", "--layers", "--input-shape", "1", "28", "28")
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
    bad = run("predict", str(path), "--mode", "fc*=fast")
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
    """Grouping pads every (row, code) run to a block: for a small layer with many codes that
    outgrows one code per entry, so it is not chosen; for a large layer with at most 64 codes
    the tiled form is (at most 32 with AVX2); with more codes, grouping. Without AVX-512, one
    code per entry where no tiled form applies."""

    def forms_of(rows, columns, codes_count):
        return [csr_weight(rows, columns, 0.35, codes_count, 5, form)[0] for form in (None, "grouped", "per-entry")]

    automatic, grouped, per_entry = forms_of(32, 16, 64)  # like SqueezeNet's fire2.expand1x1
    assert grouped.nbytes > forms.SIZE_LIMIT * per_entry.nbytes
    assert automatic.form == ("tiled" if tiled.available() else "per-entry")
    assert tiled_bytes(automatic) <= forms.SIZE_LIMIT * per_entry.nbytes
    automatic, grouped, per_entry = forms_of(300, 2000, 16)
    assert automatic.form == ("tiled" if tiled.available() or tiled_avx2.available() else "per-entry")
    assert tiled_bytes(automatic) <= forms.SIZE_LIMIT * per_entry.nbytes
    automatic, grouped, per_entry = forms_of(300, 2000, 100)
    assert automatic.form == ("grouped" if tiled.available() else "per-entry")
    assert grouped.nbytes <= forms.SIZE_LIMIT * per_entry.nbytes


@needs_tiled
def test_a_very_sparse_layer_does_not_take_the_tiled_form():
    """At 0.5% density nearly every (chunk, tile) word is padding: far larger than per entry."""
    weight, _ = csr_weight(512, 4096, 0.005, 32, 9)
    tiled_weight, _ = csr_weight(512, 4096, 0.005, 32, 9, "tiled")
    per_entry, _ = csr_weight(512, 4096, 0.005, 32, 9, "per-entry")
    assert tiled_bytes(tiled_weight) > forms.SIZE_LIMIT * per_entry.nbytes
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
