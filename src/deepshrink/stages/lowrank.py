"""Stage 0 (optional): SVD low-rank factorization at per-layer ranks chosen under a MAC budget,
then fine-tuning. The result's `structure` lets every later load rebuild the factored layers."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from deepshrink.errors import ConfigError
from deepshrink.inputs import take, to_device
from deepshrink.settings import DistillSettings, between, check_fields, choices, optimizer_field
from deepshrink.stages.base import Stage, StageContext, StageResult, register_stage
from deepshrink.stages.retraining import criterion, fine_tune, training_config
from deepshrink.train import evaluate, inputs_and_targets, resolve_device


@dataclass(frozen=True)
class LowrankSettings:
    """SVD low-rank factorization at per-layer ranks chosen under a MAC budget."""

    budget: float = field(default=0.5, metadata=between(1e-6, 1.0, help="fraction of the original MACs to keep"))
    method: str = field(
        default="pos",
        metadata=choices(
            "cptv",
            "pos",
            "relaxed",
            help="cptv: one energy fraction for all layers; pos: best product of kept energies; relaxed: masks "
            "optimised on the training loss, its roundings, POS and CPTV each fine-tuned and the highest "
            "validation metric kept",
        ),
    )
    scheme: str = field(default="zhang", metadata=choices("zhang", "tai", help="how convolutions are matricized"))
    finetune_epochs: int = field(default=2, metadata=between(0, help="fine-tuning epochs after factorizing"))
    # None (the default): as many as finetune_epochs, so each candidate is scored on the outcome
    # the final fine-tuning will give it.
    selection_epochs: int | None = field(
        default=None,
        metadata=between(
            0,
            help="relaxed: fine-tuning epochs per candidate before scoring it on validation; 0 scores on the "
            "training loss instead (default: as many as finetune_epochs)",
        ),
    )
    # One by default: five did not choose better on the LeNets (BENCHMARKS.md), because the
    # validation images, not the shuffles, limit how finely candidates can be compared.
    selection_seeds: int = field(
        default=1,
        metadata=between(
            1, help="relaxed: fine-tune each candidate this many times, each with its own shuffle, and compare means"
        ),
    )
    projection: str = field(
        default="euclidean",
        metadata=choices(
            "euclidean",
            "cost",
            "both",
            help="relaxed: the descent's metric; cost moves masks by gradient per MAC and finds lower-loss ranks "
            "at tight budgets, both keeps the roundings of the two",
        ),
    )
    learning_rate: float = field(default=0.01, metadata=between(1e-12, help="fine-tuning learning rate"))
    optimizer: str = optimizer_field("fine-tuning")
    weight_decay: float = field(default=5e-4, metadata=between(0.0, help="fine-tuning weight decay"))
    batch_size: int = field(default=128, metadata=between(1, help="fine-tuning batch size"))
    distill: DistillSettings | None = None

    def __post_init__(self) -> None:
        check_fields(self)


def factorize_stage(model: nn.Module, settings: LowrankSettings, context: StageContext) -> StageResult:
    """Factorize `model` in place at ranks chosen under the MAC budget, then fine-tune.

    Args:
        model: the model to factorize, in place.
        settings: the MAC budget, the rank selection method, the convolution scheme and the
            fine-tuning.
        context: the loaders (required: MACs are measured on an example), seed, device and task.

    Returns:
        The result: the ranks, the per-layer MACs, and the factored structure.

    Raises:
        ConfigError: no data was given.
    """
    from deepshrink.lowrank import factorize, layer_spectra, select_cptv, select_pos, structure_of

    if context.loaders is None:
        raise ConfigError("lowrank measures each layer's MACs on an example and fine-tunes: it needs data")
    device = resolve_device(context.device)
    model.to(device)
    loaders, seed = context.loaders, context.seed
    loss = criterion(settings, context, model)
    example = to_device(take(inputs_and_targets(next(iter(loaders.validation)))[0], slice(0, 1)), device)
    spectra = layer_spectra(model, example, settings.scheme)
    if settings.method == "cptv":
        choice = select_cptv(spectra, settings.budget)
    elif settings.method == "pos":
        choice = select_pos(spectra, settings.budget)
    else:
        from deepshrink.lowrank.relaxed import RelaxedOptions, Selection, select_relaxed

        selection = Selection()
        epochs = settings.finetune_epochs if settings.selection_epochs is None else settings.selection_epochs
        if epochs:
            selection = Selection(
                validation=loaders.validation,
                finetune=training_config(settings, context, epochs),
                # The final fine-tuning's batch size, shuffled differently; the same shuffles for every candidate.
                loaders=lambda selection_seed: loaders.train(settings.batch_size, selection_seed),
                seeds=tuple(range(seed + 1, seed + 1 + settings.selection_seeds)),
                # Scored after the fine-tuning the winner will get, distillation included.
                criterion=loss,
            )
        choice = select_relaxed(
            model,
            spectra,
            settings.budget,
            loaders.train(256, seed + 1),
            RelaxedOptions(projection=settings.projection, selection=selection, task=context.task),
            device=device,
            progress=context.progress,
        )
    parameters_before = sum(parameter.numel() for parameter in model.parameters())
    factorize(model, spectra, choice.ranks, choice.components)
    metrics = {"validation_metric_after_factorizing": evaluate(model, loaders.validation, device, context.task).metric}
    fine_tune(model, settings, context, epochs=settings.finetune_epochs, description="fine-tune factors", loss=loss)
    metrics["validation_metric"] = evaluate(model, loaders.validation, device, context.task).metric
    log = {
        "method": settings.method,
        "ranks": choice.ranks,
        "mac_fraction": choice.mac_fraction,
        "candidates": choice.candidates,
        "layers": {
            name: {"full_rank": spectrum.full_rank, "dense_macs": spectrum.dense_macs, "macs": spectrum.macs(rank)}
            for name, spectrum in spectra.items()
            for rank in [choice.ranks[name]]
        },
        "parameters": [parameters_before, sum(parameter.numel() for parameter in model.parameters())],
    }
    return StageResult("lowrank", log, metrics, structure=structure_of(choice.ranks, settings.scheme))


def summarize(model: nn.Module, result: StageResult) -> str:
    """The per-layer rank table and the MACs and parameters kept.

    Args:
        model: the model after the stage (the table comes from `result`).
        result: the lowrank stage's result.

    Returns:
        The rank table, and the MACs and parameters kept.
    """
    from deepshrink.tables import render_table

    rows = [
        [name, f"{layer['full_rank']}", "dense" if rank is None else str(rank), f"{layer['dense_macs']:,}"]
        + [f"{layer['macs']:,}"]
        for name, layer in result.log["layers"].items()
        for rank in [result.log["ranks"][name]]
    ]
    before, after = result.log["parameters"]
    return "\n".join(
        [
            render_table(["layer", "full rank", "rank", "MACs before", "MACs after"], rows),
            f"{result.log['method'].upper()}: {100 * result.log['mac_fraction']:.1f}% of the MACs kept, "
            f"parameters {before:,} -> {after:,}; validation metric "
            f"{result.metrics['validation_metric_after_factorizing']:.4f} right after factorizing",
        ]
    )


STAGE = register_stage(
    Stage(
        "lowrank",
        LowrankSettings,
        factorize_stage,
        order=10,
        description="SVD low-rank factorization at per-layer ranks chosen under a MAC budget, then fine-tuning",
        summarize=summarize,
        changes_architecture=True,
    )
)
