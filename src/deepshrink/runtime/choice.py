"""How each compressed layer computes, per range of batch sizes, chosen by measuring.

Which product is fastest depends on the CPU (AVX-512 or not), the layer's shape and density,
whether its weights fit in cache, and the batch size: on an AVX2 CPU torch's own CSR product
beat our CSR kernels at batch 8 and 64, and dense GEMV beats any sparse form on small layers,
where a call's fixed cost dominates. No fixed rule gets all of these right on every machine, so
`load_runtime` times the candidates on the running machine, once per layer at load:

- "compressed": the layer's CodebookWeight (tiled, blocked, grouped or per-entry form: codebook indices);
- "csr": torch's sparse CSR product on float32 values (torch.sparse_csr_tensor);
- "dense": torch.nn.functional.linear on the decoded float32 matrix.

Each range of batch sizes (BATCH_RANGES: one example, small batches, large batches) gets the
fastest candidate at its representative size. A layer whose every range runs dense stays a
plain nn.Linear (nn.Conv2d). A convolution is measured the same way (compressed through im2col against
torch's dense convolution) when the input size is known (`load_runtime(input_shape=...)`, which
`bench` and `predict` pass), since which is faster depends on it. A torch form is built only
for the ranges it wins, and its memory is counted in the layer's resident bytes.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from deepshrink.runtime.bench import median_seconds
from deepshrink.runtime.forms import CodebookWeight

KINDS = ("compressed", "csr", "dense")
# (largest batch size of the range, the size measured for it); the last range is unbounded.
# range_of hard-codes the limits, as it runs on every forward.
BATCH_RANGES = ((1, 1), (16, 8), (None, 64))
# Per candidate and batch size: calls timed in each of ROUNDS interleaved rounds, enough to
# fill about MEASURE_SECONDS of a round (a noisy neighbour then slows every candidate alike).
ROUNDS = 5
MEASURE_SECONDS = 0.003
MAXIMUM_CALLS = 50
# Where the two fastest kinds lie within CLOSE of each other, they are timed again, this many
# rounds more. A large layer gets one call a round, and five single calls of torch's CSR product
# and of the per-entry kernel at batch 8 (AVX2 code, AlexNet's fc6-fc8) picked the slower of the
# two by up to 1.3x in a later timing.
CLOSE = 1.15
MORE_ROUNDS = 10
# Calls before the one that sizes the rounds. A kernel's first calls in a process load its
# compiled code and fault in its pages: sized by the first call, the compressed form got one
# call per round and lost batch 1 to dense in LeNet-300-100's fc1 at 2-4x its real time.
WARMUP_CALLS = 3
# A call at least this long is past what warming up is for (a kernel's first calls), and its
# single timing is far above the timer's and the scheduler's noise: the warm-up stops after one
# such call, and a kind whose one timed call took more than DECISIVE times the fastest kind's
# is out without rounds. A ResNet-18 at 224x224 spent 95 of its 96 s of load timing its
# convolutions through im2col (0.1 s a call at batch 64, 3-8x dense's) over and over.
LONG_CALL_SECONDS = 0.005
DECISIVE = 3.0
LARGE_BATCH_ELEMENTS = 1 << 22  # values in the large-batch range's timed inputs, at most (representative_batch)


def range_of(batch: int) -> int:
    """The index in BATCH_RANGES of a batch size (called on every forward: no loop).

    Args:
        batch: the batch size.

    Returns:
        0 (batch 1), 1 (up to 16) or 2 (larger).
    """
    return 0 if batch <= 1 else 1 if batch <= 16 else 2


@dataclass
class LayerChoice:
    """The kind each batch range runs (`plans`), the seconds measured per (kind, batch size
    timed: `representative_batch`), and the torch forms the plans need (the others are not kept)."""

    plans: tuple[str, ...]
    seconds: dict[tuple[str, int], float] = field(default_factory=dict)
    dense: torch.Tensor | None = None
    csr: torch.Tensor | None = None

    @property
    def all_dense(self) -> bool:
        """Whether every batch-size range runs the dense torch form."""
        return all(plan == "dense" for plan in self.plans)


def _torch_forms(weight: CodebookWeight) -> tuple[torch.Tensor, torch.Tensor]:
    dense = weight.to_dense()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": a user cannot act on it
        warnings.simplefilter("ignore", UserWarning)
        return dense, dense.to_sparse_csr()


def _time_rounds(layers: dict, inputs: torch.Tensor, calls: dict, rounds: dict, count: int) -> None:
    """Append to rounds[kind] the median seconds of calls[kind] calls of each layer, in `count`
    interleaved rounds."""
    for _ in range(count):
        for kind, layer in layers.items():
            rounds[kind].append(median_seconds(lambda layer=layer: layer(inputs), calls[kind], warmup=0))


def representative_batch(nominal: int, input_size: tuple[int, ...]) -> int:
    """The batch size timed for a range whose representative is `nominal`: that, or for the
    large-batch range fewer examples where `nominal` of them would hold more than
    LARGE_BATCH_ELEMENTS values (never fewer than the range's least, 17). By then a layer's time
    is linear in the batch for every kind, so the ranking holds, at a third of the time and
    memory for a ResNet's first convolutions at 224 x 224 (200,704 values an example).

    Args:
        nominal: the range's representative batch size (BATCH_RANGES).
        input_size: one example's input shape.

    Returns:
        The batch size to time.
    """
    if nominal <= BATCH_RANGES[1][0]:
        return nominal
    elements = max(math.prod(input_size), 1)
    return max(BATCH_RANGES[1][0] + 1, min(nominal, LARGE_BATCH_ELEMENTS // elements))


def _seconds_of_one_call(layer, inputs: torch.Tensor) -> float:
    started = time.perf_counter()
    layer(inputs)
    return time.perf_counter() - started


def _measure(layers: dict, input_size: tuple[int, ...]) -> LayerChoice:
    """Time each kind's layer (the same layer with that kind in every range) at each range's
    representative batch size; the fastest per range wins, ties to the earlier kind. Where
    one call takes LONG_CALL_SECONDS or more, a kind more than DECISIVE times slower than the
    fastest on its one sizing call keeps that call's time and is not timed in rounds."""
    kinds = tuple(layers)
    generator = torch.Generator().manual_seed(0)
    seconds: dict[tuple[str, int], float] = {}
    plans = []
    with torch.no_grad():
        for _, nominal in BATCH_RANGES:
            batch = representative_batch(nominal, input_size)
            inputs = torch.randn(batch, *input_size, generator=generator)
            calls, once = {}, {}
            for kind, layer in layers.items():  # warm up, then size the rounds by one more call
                for _ in range(WARMUP_CALLS):
                    if _seconds_of_one_call(layer, inputs) >= LONG_CALL_SECONDS:
                        break
                once[kind] = max(_seconds_of_one_call(layer, inputs), 1e-7)
                calls[kind] = int(min(max(MEASURE_SECONDS / once[kind], 1), MAXIMUM_CALLS))
            fastest = min(once.values())
            decided = fastest >= LONG_CALL_SECONDS
            contenders = [kind for kind in kinds if not decided or once[kind] <= DECISIVE * fastest]
            rounds: dict[str, list[float]] = {kind: [once[kind]] for kind in kinds if kind not in contenders}
            rounds |= {kind: [] for kind in contenders}
            _time_rounds({kind: layers[kind] for kind in contenders}, inputs, calls, rounds, ROUNDS)
            ranked = sorted(contenders, key=lambda kind: statistics.median(rounds[kind]))
            if len(ranked) > 1 and statistics.median(rounds[ranked[1]]) < CLOSE * statistics.median(rounds[ranked[0]]):
                _time_rounds({kind: layers[kind] for kind in ranked[:2]}, inputs, calls, rounds, MORE_ROUNDS)
            for kind in kinds:
                seconds[(kind, batch)] = statistics.median(rounds[kind])
            plans.append(min(kinds, key=lambda kind: (seconds[(kind, batch)], kinds.index(kind))))
    return LayerChoice(tuple(plans), seconds)


def measure_linear(weight: CodebookWeight, kinds: tuple[str, ...] = KINDS) -> LayerChoice:
    """Time every kind at each range's representative batch size and choose the fastest per
    range; ties go to the earlier kind in `kinds` (the compressed form first: it is the smallest).

    What is timed is the layer's own forward with that kind everywhere, module call and input
    conversion included, so the comparison is the one a caller sees.

    Args:
        weight: the compressed weight.
        kinds: the kinds to time ("compressed", "csr", "dense").

    Returns:
        The LayerChoice, with the torch forms it chose.
    """
    from deepshrink.runtime.modules import CompressedLinear  # the module uses this one

    dense, csr = _torch_forms(weight)
    layers = {
        kind: CompressedLinear(weight, None, LayerChoice((kind,) * len(BATCH_RANGES), dense=dense, csr=csr))
        for kind in kinds
    }
    choice = _measure(layers, (weight.shape[1],))
    choice.dense = dense if "dense" in choice.plans else None
    choice.csr = csr if "csr" in choice.plans else None
    return choice


def measure_conv(weight: CodebookWeight, like: nn.Conv2d, input_size: tuple[int, int, int]) -> LayerChoice:
    """The same for a convolution on inputs of `input_size` (channels, height, width): the
    compressed form through im2col against torch's dense convolution (no CSR convolution).

    Args:
        weight: the compressed weight, as a (out, in x kh x kw) matrix.
        like: the dense convolution (stride, padding, ...).
        input_size: (channels, height, width).

    Returns:
        The LayerChoice.
    """
    from deepshrink.runtime.modules import CompressedConv2d

    dense = weight.to_dense().reshape(like.weight.shape)
    layers = {
        kind: CompressedConv2d(weight, None, like, LayerChoice((kind,) * len(BATCH_RANGES), dense=dense))
        for kind in ("compressed", "dense")
    }
    choice = _measure(layers, tuple(input_size))
    choice.dense = dense if "dense" in choice.plans else None
    return choice


# Layers whose densities differ by less than this share a measurement (`measurement_key`).
DENSITY_STEP = 0.01


def measurement_key(weight: CodebookWeight, *context) -> tuple:
    """What a measured choice depends on, to within the timing's noise: the matrix's shape, its
    form and its density to DENSITY_STEP, and `context` (a convolution's input size and
    geometry). Layers alike (a transformer's twelve query projections) are measured once: the
    measurement was 93% of `load_runtime`'s 17.6 s on a BERT-base file (BENCHMARKS.md).

    Args:
        weight: the compressed weight.
        *context: anything else the timing depends on.

    Returns:
        A hashable key.
    """
    return (weight.shape, weight.form, round(weight.density / DENSITY_STEP), *context)


def choice_like(measured: LayerChoice, weight: CodebookWeight, shape: tuple[int, ...] | None = None) -> LayerChoice:
    """The plans measured on another layer alike (`measurement_key`), or fixed ones, for
    `weight`: its own torch forms for the kinds the plans use, no seconds (this layer was not timed).

    Args:
        measured: the alike layer's choice (its plans are what count).
        weight: this layer's compressed weight.
        shape: a convolution's weight shape.

    Returns:
        The LayerChoice.
    """
    plans = measured.plans
    if not ({"dense", "csr"} & set(plans)):
        return LayerChoice(plans)
    dense, csr = _torch_forms(weight)
    if shape is not None:
        dense = dense.reshape(shape)
    return LayerChoice(plans, dense=dense if "dense" in plans else None, csr=csr if "csr" in plans else None)


def fixed_choice(kind: str, weight: CodebookWeight, shape: tuple[int, ...] | None = None) -> LayerChoice:
    """Every range running `kind` (no measurement); `shape` is a convolution's weight shape.

    Args:
        kind: "compressed", "csr" or "dense".
        weight: the compressed weight.
        shape: a convolution's weight shape.

    Returns:
        The LayerChoice, with the torch form it needs.
    """
    return choice_like(LayerChoice((kind,) * len(BATCH_RANGES)), weight, shape)


def resident_bytes(choice: LayerChoice) -> int:
    """Bytes of the torch forms a choice keeps beside the compressed form.

    Args:
        choice: the layer's choice.

    Returns:
        The bytes.
    """
    total = 0
    if choice.dense is not None:
        total += choice.dense.numel() * choice.dense.element_size()
    if choice.csr is not None:
        total += sum(
            part.numel() * part.element_size()
            for part in (choice.csr.crow_indices(), choice.csr.col_indices(), choice.csr.values())
        )
    return total
