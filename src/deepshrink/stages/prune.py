"""Stage 1: magnitude pruning in rounds with retraining (Han et al. 2015), Dynamic Network Surgery
(Guo et al. 2016) or sparse variational dropout (Molchanov et al. 2017); the result is an
ordinary pruning mask on each layer."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from deepshrink.errors import ConfigError
from deepshrink.inputs import take
from deepshrink.settings import DistillSettings, between, check_fields, choices, layer_globs, optimizer_field
from deepshrink.stages.base import Stage, StageContext, StageResult, register_stage
from deepshrink.stages.retraining import criterion, fine_tune, training_config
from deepshrink.train import evaluate, inputs_and_targets

PRUNE_METHODS = ("magnitude", "dns", "variational")
DEAD_UNITS = ("keep", "clear")
# The settings each method takes its sparsity from (variational learns it: none).
TARGETS = {"magnitude": ("global_sparsity", "quality", "sparsity"), "dns": ("crate", "sparsity"), "variational": ()}


@dataclass(frozen=True)
class PruneSettings:
    """How much to prune: with method magnitude, exactly one of `sparsity` or `quality`
    (per-layer globs) or `global_sparsity`; with method dns, `sparsity` or `crate`; method
    variational learns each weight's dropout rate and prunes where it ends high (no sparsity
    to give: `kl_weight` and `log_alpha_threshold` set how far it goes)."""

    method: str = field(
        default="magnitude",
        metadata=choices(
            *PRUNE_METHODS,
            help="magnitude: prune then retrain with masks held, `rounds` times; dns: Dynamic Network Surgery "
            "for `retrain_epochs` epochs; variational: sparse variational dropout for `retrain_epochs` epochs",
        ),
    )
    sparsity: dict[str, float] | None = field(
        default=None,
        metadata=layer_globs(between(0.0, 1.0, open_high=True), help="final fraction of LAYER's weights to prune"),
    )
    quality: dict[str, float] | None = field(
        default=None,
        metadata=layer_globs(
            between(0.0),
            help="method magnitude, Han's rule: prune |w| < Q x std(w) of the remaining weights each round",
        ),
    )
    crate: dict[str, float] | None = field(
        default=None,
        metadata=layer_globs(
            between(0.0), help="method dns, the crate c of Guo et al. (2016): threshold mean + c x std of |w|"
        ),
    )
    global_sparsity: float | None = field(
        default=None,
        metadata=between(
            0.0, 1.0, open_high=True, help="one magnitude threshold across `layers`, pruning this fraction"
        ),
    )
    layers: list[str] | None = field(
        default=None,
        metadata=layer_globs(
            help="the layer globs one global threshold spans, or variational dropout prunes (default: all)"
        ),
    )
    rounds: int = field(default=6, metadata=between(1, help="prune-retrain rounds"))
    retrain_epochs: int = field(default=8, metadata=between(0, help="retraining epochs per round"))
    learning_rate: float = field(default=0.02, metadata=between(1e-12, help="retraining learning rate"))
    weight_decay: float = field(default=5e-4, metadata=between(0.0, help="retraining weight decay"))
    batch_size: int = field(default=128, metadata=between(1, help="retraining batch size"))
    finetune_epochs: int = field(
        default=0, metadata=between(0, help="then retrain this many epochs with the masks fixed, at half the rate")
    )
    distill: DistillSettings | None = None
    optimizer: str = optimizer_field("retraining")
    dead_units: str = field(
        default="keep",
        metadata=choices(
            *DEAD_UNITS,
            help="at the end, clear: zero the biases of Linear units that nothing reads (folding the "
            "constant of each unit that reads nothing into the next layer's bias first); exact, and "
            "smaller files where whole units died (prune/dead_units.py)",
        )
        | {"recorded_when_set": True},
    )
    # Method variational. Written into a recipe's record only when set, so that the keys and
    # files of the other methods stay as they were.
    log_alpha_threshold: float = field(
        default=3.0,
        metadata=between(
            -8.0, 8.0, help="method variational: prune the weights whose log alpha ends above this (the paper's 3)"
        )
        | {"recorded_when_set": True},
    )
    kl_weight: float = field(
        default=1.0,
        metadata=between(0.0, help="method variational: the KL term's weight (1: the ELBO's; more prunes more)")
        | {"recorded_when_set": True},
    )
    variational_learning_rate: float = field(
        default=1e-3,
        metadata=between(1e-12, help="method variational: Adam's learning rate") | {"recorded_when_set": True},
    )

    def __post_init__(self) -> None:
        check_fields(self)
        targets = TARGETS[self.method]
        given = [
            name for name in ("sparsity", "quality", "crate", "global_sparsity") if getattr(self, name) is not None
        ]
        wrong = [name for name in given if name not in targets]
        if wrong:
            takes = {
                "magnitude": "sparsity: {LAYER_GLOB: S}, quality: {LAYER_GLOB: Q} or global_sparsity: S",
                "dns": "sparsity: {LAYER_GLOB: S} or crate: {LAYER_GLOB: C}",
                "variational": "none of them: it learns each weight's dropout rate (set kl_weight, "
                "log_alpha_threshold)",
            }[self.method]
            raise ConfigError(f"method: {self.method} does not take {', '.join(wrong)}; it takes {takes}")
        # None at all is allowed here: a recipe's `target` then chooses per-layer sparsities
        # (plan.py); run on its own, the stage asks for one (`missing_target`).
        if len(given) > 1:
            raise ConfigError(f"needs exactly one of {', '.join(sorted(targets))}; got {', '.join(given)}")
        if self.method == "variational" and self.optimizer != "sgd":
            raise ConfigError(
                f"optimizer: {self.optimizer} is for methods magnitude and dns; method variational trains with Adam "
                "(set its learning rate with variational_learning_rate)"
            )
        if self.layers is not None and self.global_sparsity is None and self.method != "variational":
            raise ConfigError("layers goes with global_sparsity; per-layer targets take sparsity: {LAYER_GLOB: S}")

    @property
    def has_target(self) -> bool:
        """Whether the settings say how much to prune (a sparsity, quality, crate or global
        sparsity; method variational finds its own)."""
        return self.method == "variational" or any(
            getattr(self, name) is not None for name in ("sparsity", "quality", "crate", "global_sparsity")
        )

    def missing_target(self) -> str:
        """The message for settings that name no sparsity at all.

        Returns:
            The message, naming the options this method takes.
        """
        targets = ", ".join(TARGETS[self.method])
        return (
            f"needs exactly one of {targets}; got none (or give the recipe a target: {{ratio: R}} or "
            "{max_metric_drop: PERCENT}, and per-layer sparsities are chosen for you)"
        )


def prune_stage(model: nn.Module, settings: PruneSettings, context: StageContext) -> StageResult:
    """Prune `model` in place: magnitude pruning in rounds with retraining, DNS, or sparse
    variational dropout.

    Args:
        model: the model to prune, in place.
        settings: the sparsities (or quality, crate, global sparsity), method, rounds and retraining.
        context: the loaders (None: masks applied round after round without retraining), seed,
            device and task.

    Returns:
        The result: the per-layer weights and FLOPs kept, and the retraining's history.

    Raises:
        ConfigError: the settings name no sparsity.
    """
    from deepshrink.prune.schedule import iterative_pruning
    from deepshrink.prune.statistics import as_dicts, layer_statistics, totals
    from deepshrink.prune.surgery import dynamic_network_surgery
    from deepshrink.prune.variational import posterior_resolution, variational_dropout

    if not settings.has_target:
        raise ConfigError(f"prune: {settings.missing_target()}")
    if context.loaders is None:
        return _prune_without_data(model, settings)
    seed, loaders = context.seed, context.loaders
    retrain = training_config(settings, context, settings.retrain_epochs)
    # One loader for the whole stage: the fine-tuning after DNS goes on with its shuffles.
    train_loader = loaders.train(settings.batch_size, seed)
    loss = criterion(settings, context, model)
    log: dict = {"method": settings.method}
    if settings.method == "dns":
        result = dynamic_network_surgery(
            model,
            train_loader,
            retrain,
            crates=settings.crate,
            sparsities=settings.sparsity,
            validation_loader=loaders.validation,
            device=context.device,
            task=context.task,
            criterion=loss,
            progress=context.progress,
        )
        log.update(spliced=result.spliced, thresholds=result.thresholds)
    elif settings.method == "variational":
        result = variational_dropout(
            model,
            train_loader,
            training_config(
                settings, context, settings.retrain_epochs, settings.variational_learning_rate, optimizer="adam"
            ),
            layers=settings.layers,
            threshold=settings.log_alpha_threshold,
            kl_weight=settings.kl_weight,
            validation_loader=loaders.validation,
            device=context.device,
            task=context.task,
            criterion=loss,
            progress=context.progress,
        )
        log["epochs"] = [vars(record) for record in result.history.epochs]
    else:
        rule = _mask_rule(settings)
        history = iterative_pruning(
            model,
            train_loader,
            loaders.validation,
            rule,
            rounds=settings.rounds,
            retrain=retrain,
            device=context.device,
            task=context.task,
            criterion=loss,
            progress=context.progress,
        )
        log["rounds"] = [vars(record) for record in history.rounds]
    fine_tune(
        model,
        settings,
        context,
        epochs=settings.finetune_epochs,
        description="fine-tune (masks fixed)",
        loss=loss,
        learning_rate=settings.learning_rate / 2,
        loader=train_loader,
    )
    _clear_dead_units(model, settings, log)
    if settings.method == "variational":  # for `quantize: {bits_from: posterior}`
        log["posterior"] = posterior_resolution(model, result.posterior_std)
    metrics = {"validation_metric": evaluate(model, loaders.validation, context.device, context.task).metric}
    rows = layer_statistics(model, take(inputs_and_targets(next(iter(loaders.validation)))[0], slice(0, 2)))
    log["layers"] = as_dicts(rows)
    metrics["kept_fraction"] = totals(rows)["kept_fraction"]
    return StageResult("prune", log, metrics)


def _clear_dead_units(model: nn.Module, settings: PruneSettings, log: dict) -> None:
    """With `dead_units: clear`, clear the dead units' biases (prune/dead_units.py) and log them."""
    if settings.dead_units == "clear":
        from deepshrink.prune.dead_units import clear_dead_units

        log["dead_units"] = [vars(item) for item in clear_dead_units(model)]


def _mask_rule(settings: PruneSettings):
    """The magnitude rule the settings name: per-layer sparsity, Han's quality, or one global threshold."""
    from deepshrink.prune.schedule import global_sparsity_rule, per_layer_sparsity_rule, std_quality_rule

    if settings.sparsity is not None:
        return per_layer_sparsity_rule(settings.sparsity)
    if settings.quality is not None:
        return std_quality_rule(settings.quality)
    return global_sparsity_rule(settings.global_sparsity, settings.layers)


def _prune_without_data(model: nn.Module, settings: PruneSettings) -> StageResult:
    """No data: the rule's masks round after round, with no retraining between (and no metric)."""
    from deepshrink.prune.module import apply_masks
    from deepshrink.prune.statistics import as_dicts, layer_statistics, totals

    if settings.method != "magnitude":
        raise ConfigError(f"prune: method {settings.method} trains the model; without data, use magnitude pruning")
    rule = _mask_rule(settings)
    for round_index in range(1, settings.rounds + 1):
        apply_masks(model, rule(model, round_index, settings.rounds))
    log = {"method": settings.method, "without_data": "pruned without retraining: no data was given"}
    _clear_dead_units(model, settings, log)
    rows = layer_statistics(model, None)
    return StageResult("prune", log | {"layers": as_dicts(rows)}, {"kept_fraction": totals(rows)["kept_fraction"]})


def summarize(model: nn.Module, result: StageResult) -> str:
    """The paper's per-layer pruning table (weights and FLOPs kept) and the compression by pruning.

    Args:
        model: the model after the stage (the table comes from `result`).
        result: the prune stage's result.

    Returns:
        The per-layer table and the compression by pruning.
    """
    from deepshrink.prune.statistics import format_table, from_dicts, totals

    rows = from_dicts(result.log["layers"])
    summary = totals(rows)
    lines = [
        format_table(rows),
        f"compression by pruning: {summary['compression']:.1f}x ({100 * summary['kept_fraction']:.2f}% kept)",
    ]
    for item in result.log.get("dead_units", []):
        lines.append(
            f"dead units of {item['layer']}: {item['unread']} not read by {item['reader']}, "
            f"{item['folded']} constant ones folded into its bias; their biases cleared"
        )
    return "\n".join(lines)


STAGE = register_stage(
    Stage(
        "prune",
        PruneSettings,
        prune_stage,
        order=20,
        description="prune by magnitude (iteratively, with retraining) or by Dynamic Network Surgery",
        summarize=summarize,
    )
)
