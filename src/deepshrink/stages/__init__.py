"""The compression stages: one settings dataclass and one handler each, joined by a registry.

`run_stage(model, settings, context)` runs whichever stage `settings` belong to. To add a stage,
write one module here with its settings, its handler and a `register_stage(Stage(...))` call,
and import it below: the recipe gains a section, the pipeline runs it in `order`, and the
command line gains a command with one option per settings field.
"""

from deepshrink.stages.base import (
    Loaders,
    Stage,
    StageContext,
    StageResult,
    register_stage,
    registered_stages,
    run_stage,
    stage_for,
    stage_metadata,
    stage_named,
)
from deepshrink.stages.encode import EncodeSettings
from deepshrink.stages.lowrank import LowrankSettings
from deepshrink.stages.prune import PruneSettings
from deepshrink.stages.quantize import QuantizeSettings


def _stage_function(settings_class, verb: str):
    def apply(model, settings=None, loaders: Loaders | None = None, **context) -> StageResult:
        if loaders is None:
            from deepshrink.errors import ConfigError

            raise ConfigError(f"{verb}() needs loaders=deepshrink.Loaders(...): the data to retrain and validate on")
        settings = settings_class() if settings is None else settings
        if not isinstance(settings, settings_class):
            raise TypeError(f"{verb}() takes {settings_class.__name__}, not {type(settings).__name__}")
        return run_stage(model, settings, StageContext(loaders, **context))

    apply.__name__ = apply.__qualname__ = verb
    stage = next(stage for stage in registered_stages() if stage.settings is settings_class)
    apply.__doc__ = f"""Run the {stage.name} stage ({stage.description}) on `model`, in place.

    Args:
        model: the nn.Module to change (or, for encode, to write).
        settings: a {settings_class.__name__} (default: its defaults).
        loaders: the data (deepshrink.Loaders).
        **context: StageContext fields: seed, device, progress, teacher (distillation's
            teacher), and for encode output, model_name, metadata, protect.

    Returns:
        The StageResult: log, metrics, structure, tensors and files written.

    Raises:
        ConfigError for settings that do not fit the model; the stage's own errors.
    """
    return apply


factorize_lowrank = _stage_function(LowrankSettings, "factorize_lowrank")
prune = _stage_function(PruneSettings, "prune")
quantize = _stage_function(QuantizeSettings, "quantize")
encode = _stage_function(EncodeSettings, "encode")

__all__ = [
    "EncodeSettings",
    "Loaders",
    "LowrankSettings",
    "PruneSettings",
    "QuantizeSettings",
    "Stage",
    "StageContext",
    "StageResult",
    "register_stage",
    "registered_stages",
    "run_stage",
    "stage_for",
    "stage_metadata",
    "stage_named",
    "encode",
    "factorize_lowrank",
    "prune",
    "quantize",
]
