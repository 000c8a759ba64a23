"""Stage 3: the relative-index sparse layout and entropy coding, into one checksummed .dcz file.

The stage writes `context.output`; it leaves the model as it is. A recipe's run skips it when
the file there already records the same cache key (`written_key`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from deepshrink.settings import between, check_fields, choices, layer_globs
from deepshrink.stages.base import Stage, StageContext, StageResult, register_stage

LAYOUTS = ("csr", "csc", "dense")
CODERS = ("huffman", "ans", "fixed")
UNSHARED = ("lossless", "float16", "int8")


@dataclass(frozen=True)
class EncodeSettings:
    """Relative-index sparse layout and entropy coding; `index_bits` maps layer globs to gap widths."""

    index_bits: dict[str, int] | None = field(
        default=None,
        metadata=layer_globs(
            between(1, 16), help="gap width for LAYER, 1 to 16 (default 8 conv, 5 fc, as in the paper)"
        ),
    )
    layout: str = field(default="csr", metadata=choices(*LAYOUTS, help="sparse layout of pruned layers"))
    coder: str = field(
        default="huffman",
        metadata=choices(
            *CODERS, help="huffman (P+Q+H), ans (adaptive rANS, experimental, format 2.2) or fixed-width codes (P+Q)"
        ),
    )
    unshared: str = field(
        default="lossless",
        metadata=choices(
            *UNSHARED,
            help="tensors that are not weight-shared (biases, norms, unpruned layers): lossless (zstd byte "
            "planes), float16 (half the bytes; about 3 significant digits) or int8 (parameters in a quarter: 255 "
            "levels times a per-tensor scale, error at most half a level; buffers in float16; format 2.4)",
        )
        | {"recorded_when_set": True},
    )

    def __post_init__(self) -> None:
        check_fields(self)


def encode_stage(model: nn.Module, settings: EncodeSettings, context: StageContext) -> StageResult:
    """Write `model` (pruned and weight-shared layers compressed, the rest raw) to `context.output`.

    Args:
        model: the model to write (moved to the CPU).
        settings: the index widths, the sparse layout, the entropy coder and how tensors that are
            not shared are stored.
        context: the output path, the model name, the file's metadata and the inputs not to
            overwrite.

    Returns:
        The result: the file's name, its size and its compression ratio.

    Raises:
        ConfigError: the context has no output path or model name.
    """
    from deepshrink.compressed import file_sizes, save_compressed
    from deepshrink.errors import ConfigError

    if context.output is None or context.model_name is None:
        raise ConfigError("the encode stage needs an output path and a model name in its context")
    path = save_compressed(
        model.cpu(),
        context.output,
        model_name=context.model_name,
        index_bits=settings.index_bits,
        layout=settings.layout,
        coder=settings.coder,
        unshared=settings.unshared,
        metadata=context.metadata,
        protect=context.protect,
    )
    _, totals = file_sizes(path)
    metrics = {"file_bytes": totals["file_bytes"], "compression": totals["compression"]}
    return StageResult("encode", {"file": Path(path).name}, metrics, files=[str(path)])


def written_key(path: Path) -> str | None:
    """The cache key a previously written .dcz file records, if it is there and readable.

    Args:
        path: the .dcz file.

    Returns:
        The key, or None when the file is missing, damaged or has none.
    """
    if not path.exists():
        return None
    from deepshrink.compressed import inspect_header
    from deepshrink.errors import FormatError

    try:
        return inspect_header(path)[0].get("metadata", {}).get("stage_key")
    except FormatError:
        return None  # damaged: write it again


def summarize(model: nn.Module, result: StageResult) -> str:
    """The paper's per-layer size columns, read back from the written file's header.

    Args:
        model: the model after the stage (the table comes from `result`).
        result: the encode stage's result.

    Returns:
        The per-layer size table, and the file's size against the fp32 parameters.
    """
    from deepshrink.compressed import file_sizes
    from deepshrink.encode.sizes import format_size_table

    path = result.files[0]
    rows, totals = file_sizes(path)
    return (
        f"{format_size_table(rows, totals)}\n"
        f"file: {path} ({totals['file_bytes']:,} bytes, {totals['compression']:.1f}x smaller than "
        f"{totals['fp32_parameter_bytes']:,} fp32 parameter bytes)"
    )


STAGE = register_stage(
    Stage(
        "encode",
        EncodeSettings,
        encode_stage,
        order=40,
        after_folding=True,
        description="encode a pruned, weight-shared checkpoint into a .dcz file and report its size",
        changes_model=False,
        always=True,
        output_suffix=".dcz",
        written_key=written_key,
        summarize=summarize,
    )
)
