"""Stage 2: trained quantization. Per-layer k-means weight sharing (the paper's 8 bits for
convolutions and 5 for fully connected layers unless `bits` says otherwise), then the centroids
fine-tuned with the task loss. The k-means records (Figure 4) travel in the result's tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from deepshrink.settings import DistillSettings, between, check_fields, choices, layer_globs
from deepshrink.stages.base import Stage, StageContext, StageResult, register_stage
from deepshrink.stages.retraining import criterion, fine_tune
from deepshrink.train import evaluate

INITS = ("linear", "density", "forgy", "optimal")
OPTIMIZERS = ("sgd", "adam")
RECORD_ARRAYS = ("initial_centroids", "centroids", "sample")


@dataclass(frozen=True)
class QuantizeSettings:
    """Per-layer k-means weight sharing; `bits` maps layer globs to bits (default 8 conv / 5 fc)."""

    bits: dict[str, int] | None = field(
        default=None,
        metadata=layer_globs(
            between(1, 16), help="bits per weight for LAYER, 1 to 16 (default: 8 for conv, 5 for fc, as in the paper)"
        ),
    )
    init: str = field(
        default="linear", metadata=choices(*INITS, help="centroid initialisation (linear: the paper's best)")
    )
    finetune_epochs: int = field(default=1, metadata=between(0, help="centroid fine-tuning epochs"))
    optimizer: str = field(default="adam", metadata=choices(*OPTIMIZERS, help="fine-tuning optimizer"))
    learning_rate: float = field(default=1e-4, metadata=between(1e-12, help="fine-tuning learning rate"))
    weight_decay: float = field(
        default=0.0, metadata=between(0.0, help="fine-tuning weight decay (decay would pull centroids to zero)")
    )
    batch_size: int = field(default=128, metadata=between(1, help="fine-tuning batch size"))
    distill: DistillSettings | None = None

    def __post_init__(self) -> None:
        check_fields(self)


def quantize_stage(model: nn.Module, settings: QuantizeSettings, context: StageContext) -> StageResult:
    """Share `model`'s weights in place through k-means codebooks, then fine-tune the centroids.

    Args:
        model: the model whose weights are shared, in place.
        settings: the bits per layer, the k-means initialisation and the centroids' fine-tuning.
        context: the loaders (None: shared without fine-tuning), seed, device and task.

    Returns:
        The result: the per-layer bits and distinct values, the k-means records (as tensors) and
        the fine-tuning's history.
    """
    from deepshrink.quantize.report import sharing_rows
    from deepshrink.quantize.shared import share_weights

    records = share_weights(model, settings.bits, settings.init, seed=context.seed)
    log: dict = {
        "init": settings.init,
        "bits": {name: record.bits for name, record in records.items()},
        "records": {
            name: {"bits": record.bits, "zero_code": record.zero_code, "inertia": float(record.inertia)}
            for name, record in records.items()
        },
        "layers": sharing_rows(model, records),
    }
    tensors = {
        f"{name}/{part}": torch.from_numpy(np.asarray(getattr(record, part), dtype=np.float64))
        for name, record in records.items()
        for part in RECORD_ARRAYS
    }
    if context.loaders is None:
        log["without_data"] = "shared without fine-tuning the centroids: no data was given"
        return StageResult("quantize", log, {}, tensors=tensors)
    loss = criterion(settings, context, model)
    metrics = {
        "validation_metric_after_sharing": evaluate(
            model, context.loaders.validation, context.device, context.task
        ).metric
    }
    epochs = fine_tune(
        model,
        settings,
        context,
        epochs=settings.finetune_epochs,
        description="fine-tune centroids",
        loss=loss,
        validate=True,
        optimizer=settings.optimizer,
    )
    metrics["validation_metric"] = evaluate(model, context.loaders.validation, context.device, context.task).metric
    if epochs:
        log["epochs"] = [vars(record) for record in epochs]
    return StageResult("quantize", log, metrics, tensors=tensors)


def sharing_records(result: StageResult) -> dict:
    """The per-layer k-means records (SharingRecord) a quantize result carries, for Figure 4.

    Args:
        result: a quantize stage's result.

    Returns:
        {layer name: SharingRecord}.
    """
    from deepshrink.quantize.shared import SharingRecord

    records = {}
    for name, meta in result.log.get("records", {}).items():
        arrays = {part: result.tensors[f"{name}/{part}"].numpy() for part in RECORD_ARRAYS}
        records[name] = SharingRecord(
            meta["bits"],
            meta["zero_code"],
            arrays["initial_centroids"],
            arrays["centroids"],
            meta["inertia"],
            arrays["sample"],
        )
    return records


def summarize(model: nn.Module, result: StageResult) -> str:
    """The per-layer sharing table: bits, and distinct values against the 2^bits limit.

    Args:
        model: the model after the stage (the table comes from `result`).
        result: the quantize stage's result.

    Returns:
        The per-layer sharing table.
    """
    from deepshrink.quantize.report import format_sharing_table

    return format_sharing_table(result.log["layers"])


STAGE = register_stage(
    Stage(
        "quantize",
        QuantizeSettings,
        quantize_stage,
        order=30,
        after_folding=True,
        description="share weights through per-layer k-means codebooks, then fine-tune the centroids",
        summarize=summarize,
    )
)
