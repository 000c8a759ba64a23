"""Recipes: what the pipeline does to a model, stage by stage, read from YAML and validated
before anything runs.

A recipe is plain data (frozen dataclasses). Reading one checks every key and value against the
dataclass fields, and an error names the file and line of the offending entry, so a typo in a
long recipe is found in a second rather than after an hour of retraining. Layer globs are
checked against the model with `Recipe.check_layers` once the model is known.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from deepshrink.errors import ConfigError
from deepshrink.plan import TargetSettings
from deepshrink.settings import DistillSettings, between, check_fields, check_value, choices
from deepshrink.stages import EncodeSettings, LowrankSettings, PruneSettings, QuantizeSettings
from deepshrink.teachers import TeacherSettings

__all__ = [
    "DataSettings",
    "DistillSettings",
    "EncodeSettings",
    "LowrankSettings",
    "PruneSettings",
    "QuantizeSettings",
    "Recipe",
    "TeacherSettings",
    "TradeoffSettings",
    "load_recipe",
    "parse_recipe",
    "recipe_from_dict",
]


BATCHNORM_POLICIES = ("fold", "freeze", "train", "recalibrate")


@dataclass(frozen=True)
class TradeoffSettings:
    """The paper's Figure 6: accuracy against compression rate for pruning only, quantization
    only, both, and SVD low-rank. Each point starts from the reference and retrains briefly."""

    sparsities: list[float] = field(
        default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95], metadata=between(0.0, 1.0, open_high=True)
    )
    bits: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 8], metadata=between(1, 16))
    combined_bits: int = field(default=5, metadata=between(1, 16))
    svd_budgets: list[float] = field(  # fractions of the MACs; POS ranks, fp32 factors
        default_factory=lambda: [0.1, 0.2, 0.35, 0.5, 0.7], metadata=between(1e-6, 1.0)
    )
    retrain_epochs: int = field(default=1, metadata=between(0))
    learning_rate: float = field(default=0.02, metadata=between(1e-12))
    # Sparse variational dropout's frontier (issue 22): one point per KL weight, each trained
    # `variational_epochs` epochs from the reference (it learns its sparsity over many epochs,
    # not one), then shared at `combined_bits`. Off by default: each point costs that training.
    variational_kl_weights: list[float] = field(
        default_factory=list,
        metadata=between(0.0, help="KL weights of sparse variational dropout points, e.g. [0.5, 1, 2]")
        | {"recorded_when_set": True},
    )
    variational_epochs: int = field(
        default=20, metadata=between(1, help="epochs of each variational point") | {"recorded_when_set": True}
    )
    # Soft weight-sharing's frontier: one point per prior weight tau (more prunes more), each
    # `soft_epochs` epochs under the mixture prior from the reference, with its default mixture.
    soft_taus: list[float] = field(
        default_factory=list,
        metadata=between(1e-12, help="taus of soft weight-sharing points, e.g. [0.002, 0.005, 0.02]")
        | {"recorded_when_set": True},
    )
    soft_epochs: int = field(
        default=10, metadata=between(1, help="epochs of each soft-sharing point") | {"recorded_when_set": True}
    )

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class DataSettings:
    train_subset: int | None = field(default=None, metadata=between(1))
    test_subset: int | None = field(default=None, metadata=between(1))

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class Recipe:
    """A whole run: the model, the seed, the data, each registered stage's settings (a stage left
    out is skipped, except the encode stage, which runs with its defaults) and the Figure 6 sweep.

    A stage's settings are reached by its name: `recipe.prune` (None when the recipe leaves the
    stage out)."""

    model: str | None = None
    seed: int = 0
    # The task's name (built-in or package.module:function); None is classification, the paper's.
    task: str | None = None
    # Which of the forward's outputs the task scores, for a model that returns several (a dict's
    # key such as Hugging Face's "logits", a tuple's index such as "0"); None: it returns one tensor.
    output: str | None = None
    batchnorm: str = field(
        default="fold",
        metadata=choices(
            *BATCHNORM_POLICIES,
            help="fold: BatchNorm folded into the layer before it where it can be, the rest frozen; freeze: eval "
            "mode while retraining; train: batch statistics (ordinary training); recalibrate: frozen, then its "
            "statistics re-estimated after each retraining",
        ),
    )
    data: DataSettings = field(default_factory=DataSettings)
    # Stage name -> its settings, for every registered stage the recipe runs.
    stages: dict[str, object] = field(default_factory=dict)
    tradeoff: TradeoffSettings | None = None
    # A size or metric target in place of per-layer sparsities and bits (plan.py chooses them).
    target: TargetSettings | None = None
    # What distillation retrains against, where a stage distills: the reference (None), or an
    # ensemble of it and more trained copies (teachers.py).
    teacher: TeacherSettings | None = None
    # Where each entry came from ("prune.sparsity.fc1" -> "recipe.yaml:12"), for error messages.
    locations: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    source: str = field(default="<recipe>", compare=False, repr=False)

    def __post_init__(self) -> None:
        from deepshrink.stages import registered_stages
        from deepshrink.tasks import BUILT_IN

        if self.batchnorm not in BATCHNORM_POLICIES:
            raise ConfigError(f"batchnorm: {self.batchnorm!r} should be one of {', '.join(BATCHNORM_POLICIES)}")
        if self.task is not None and ":" not in self.task and self.task not in BUILT_IN:
            raise ConfigError(
                f"task: {self.task!r} is not a built-in task ({', '.join(BUILT_IN)}); for your own, give "
                "package.module:function returning a deepshrink.Task"
            )
        prune, quantize = self.stages.get("prune"), self.stages.get("quantize")
        if self.target is None and prune is not None and not prune.has_target:
            raise ConfigError(f"{self.where('prune')}: prune: {prune.missing_target()}")
        if quantize is not None and quantize.bits_from == "posterior":
            if prune is None or prune.method != "variational":
                raise ConfigError(
                    f"{self.where('quantize.bits_from')}: bits_from: posterior reads the posterior of variational "
                    "dropout: add `prune: {method: variational, ...}` to this recipe, or give quantize `bits`"
                )
            if self.target is not None:
                raise ConfigError(
                    f"{self.where('target')}: a target and bits_from: posterior both choose the bits: keep one"
                )
        if self.target is not None:
            if self.plans_after_pruning and (quantize is None or quantize.method != "kmeans"):
                raise ConfigError(
                    f"{self.where('target')}: method variational learns each layer's sparsity, so a target "
                    "chooses only the bits of k-means sharing after it: add `quantize: {}` (method kmeans), "
                    "or drop the target"
                )
            if quantize is not None and quantize.method == "soft":
                raise ConfigError(
                    f"{self.where('target')}: a target chooses bits for k-means sharing; method soft learns its "
                    "codebook: drop the target (set components and tau instead) or use method kmeans"
                )
            chosen = [
                name
                for name, given in (
                    ("prune", prune is not None and prune.has_target and not self.plans_after_pruning),
                    ("quantize.bits", quantize is not None and quantize.bits is not None),
                )
                if given
            ]
            if chosen:
                raise ConfigError(
                    f"{self.where('target')}: target chooses per-layer sparsity and bits; leave them out of "
                    f"{' and '.join(chosen)} (or drop the target)"
                )
            if prune is None and quantize is None:
                raise ConfigError(f"{self.where('target')}: target needs a prune or quantize section to choose for")
            if self.stages.get("lowrank") is not None:
                raise ConfigError(f"{self.where('target')}: target does not combine with lowrank; leave one out")
        if self.teacher is not None and not self.distills:
            raise ConfigError(
                f"{self.where('teacher')}: teacher: no stage distills, so no stage would use it; add "
                "`distill: {temperature: 4.0, alpha: 0.5}` to the prune (or quantize, lowrank) section, or drop "
                "the teacher"
            )
        stages = dict(self.stages)
        for stage in registered_stages():
            if stage.always and stages.get(stage.name) is None:
                stages[stage.name] = stage.settings()
        object.__setattr__(self, "stages", stages)

    def __getattr__(self, name: str):
        # Only reached for names that are not fields: a registered stage's settings, or None.
        if name.startswith("_"):
            raise AttributeError(name)
        from deepshrink.stages import registered_stages

        if name in {stage.name for stage in registered_stages()}:
            return self.__dict__.get("stages", {}).get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute or stage {name!r}")

    def section(self, name: str) -> dict | None:
        """A stage's or section's settings as plain data (for cache keys and reports). A field
        marked `recorded_when_set` (in nested settings too, such as `distill`) appears only when
        it is not its default, so that adding one leaves earlier recipes' keys, and the files
        that record them, as they were.

        Args:
            name: a stage name, or "tradeoff".

        Returns:
            The settings as a dict, or None when the recipe leaves the section out.
        """
        value = getattr(self, name)
        if value is None:
            return None
        return _recorded(value)

    def to_dict(self) -> dict:
        """The recipe as plain data: its fields, and one entry per registered stage (None when left out).

        Returns:
            A dict that `recipe_from_dict` reads back.
        """
        from deepshrink.stages import registered_stages

        result = {"model": self.model, "seed": self.seed}
        # Written only when not the default, so that a file's recorded recipe (and a cached stage's
        # key) stays what it was before these entries existed.
        result |= {"task": self.task} if self.task is not None else {}
        result |= {"output": self.output} if self.output is not None else {}
        result |= {"batchnorm": self.batchnorm} if self.batchnorm != "fold" else {}
        result["data"] = dataclasses.asdict(self.data)
        for stage in registered_stages():
            result[stage.name] = self.section(stage.name)
        result["tradeoff"] = self.section("tradeoff")
        result |= {"target": dataclasses.asdict(self.target)} if self.target is not None else {}
        if self.teacher is not None:  # an empty list reads back as an error, so it is left out
            result["teacher"] = {key: value for key, value in dataclasses.asdict(self.teacher).items() if value != []}
        return result

    @property
    def distills(self) -> bool:
        """Whether any stage retrains against a teacher (its settings have `distill`)."""
        return any(getattr(settings, "distill", None) is not None for settings in self.stages.values())

    @property
    def plans_after_pruning(self) -> bool:
        """Whether the target is planned after the prune stage rather than before every stage:
        variational dropout learns the sparsities, so only the bits are left to choose, on the
        pruned weights."""
        prune = self.stages.get("prune")
        return self.target is not None and prune is not None and prune.method == "variational"

    def with_plan(self, plan) -> Recipe:
        """This recipe with a plan's per-layer sparsities and bits in place of its target (a
        stage the plan leaves with nothing to do is dropped; a plan made after pruning leaves
        the prune stage as it is).

        Args:
            plan: a `plan.Plan`, with per-layer `sparsity` and `bits`.

        Returns:
            A new Recipe without a target.
        """
        stages = dict(self.stages)
        if stages.get("prune") is not None and not plan.after_pruning:
            sparsity = plan.sparsity
            stages["prune"] = dataclasses.replace(stages["prune"], sparsity=sparsity) if sparsity else None
        if stages.get("quantize") is not None:
            bits = plan.bits
            stages["quantize"] = dataclasses.replace(stages["quantize"], bits=bits) if bits else None
        return dataclasses.replace(self, stages=stages, target=None)

    def where(self, path: str) -> str:
        """'recipe.yaml:12' for a dotted entry path, or the nearest enclosing entry's location.

        Args:
            path: a dotted entry path, e.g. "prune.sparsity.fc1".

        Returns:
            "FILE:LINE", or the recipe's source when no entry encloses `path`.
        """
        while path:
            if path in self.locations:
                return self.locations[path]
            path = path.rpartition(".")[0]
        return self.source

    def check_layers(self, layer_names: list[str], aliases: list[str] = ()) -> None:
        """Every layer glob in the recipe must match at least one of `layer_names` or of
        `aliases` (other names that select them: state_dict keys, the modules holding them).

        Args:
            layer_names: the model's compressible weights' names.
            aliases: other names that select them.

        Raises:
            ConfigError: a glob matches no layer; the message names its line.
        """
        from deepshrink.layers import matching

        for stage_name, settings in self.stages.items():
            for item in dataclasses.fields(settings):
                globs = getattr(settings, item.name)
                if not item.metadata.get("layer_globs") or not globs:
                    continue
                path = f"{stage_name}.{item.name}"
                for pattern in globs:
                    if not matching(pattern, [*layer_names, *aliases]):
                        raise ConfigError(
                            f"{self.where(f'{path}.{pattern}')}: {path} pattern {pattern!r} matches no layer; "
                            f"the compressible layers are {', '.join(layer_names)}"
                        )


_RECIPE_FIELDS = ("model", "seed", "task", "output", "batchnorm", "data", "tradeoff", "target", "teacher")
SHIPPED_RECIPES = Path(__file__).resolve().parent / "recipes"


def shipped_recipes() -> list[str]:
    return sorted(path.stem for path in SHIPPED_RECIPES.glob("*.yaml"))


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a YAML recipe file, or a shipped recipe by name ("lenet-5").

    Args:
        path: a YAML file, or the name of a recipe in recipes/ ("lenet-300-100", "quick").

    Returns:
        The Recipe: model, seed, data options and one settings object per stage present.

    Raises:
        ConfigError: the file is missing, not valid YAML, or a value is invalid; the message
            names the line and the key.
    """
    path = Path(path)
    if not path.exists() and path.suffix == "" and path.name in shipped_recipes():
        path = SHIPPED_RECIPES / f"{path.name}.yaml"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such recipe file; pass a YAML file or a shipped recipe: {', '.join(shipped_recipes())}"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the recipe ({error})") from error
    return parse_recipe(text, str(path))


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Validate YAML `text` into a Recipe; errors name `source` and the line.

    Args:
        text: the YAML.
        source: the file name, for errors.

    Returns:
        The Recipe.

    Raises:
        ConfigError: the YAML is malformed or empty, or a value is unknown, mistyped or out of range.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError(f"{where}: not valid YAML: {getattr(error, 'problem', None) or error}") from error
    if root is None:
        raise ConfigError(f"{source}: the recipe is empty; start from one in recipes/")
    locations: dict[str, str] = {}
    return _convert(Recipe, root, "", source, locations, {"locations": locations, "source": source})


def _recipe_sections() -> dict[str, object]:
    """The recipe's top-level keys: its own fields and one section per registered stage."""
    from deepshrink.stages import registered_stages

    hints = typing.get_type_hints(Recipe)
    sections = {name: hints[name] for name in _RECIPE_FIELDS}
    for stage in registered_stages():
        sections[stage.name] = stage.settings | None
    return sections


def recipe_from_dict(values: dict, source: str = "<dict>") -> Recipe:
    """A Recipe from plain Python data, validated exactly like a file.

    Args:
        values: the recipe as YAML would hold it.
        source: the name errors give.

    Returns:
        The Recipe.

    Raises:
        ConfigError: as for `parse_recipe`.
    """
    return parse_recipe(yaml.safe_dump(values, sort_keys=False), source)


def _line(node: yaml.Node, source: str) -> str:
    return f"{source}:{node.start_mark.line + 1}"


def _convert(cls, node: yaml.Node, path: str, source: str, locations: dict[str, str], extra: dict | None = None):
    """An instance of dataclass `cls` from a YAML mapping node, every key and value checked."""
    what = path or "the recipe"
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{_line(node, source)}: {what} should be a mapping of key: value")
    extra = extra or {}
    if cls is Recipe:  # stage sections come from the registry
        hints = _recipe_sections()
        own = {item.name: item for item in dataclasses.fields(Recipe)}
        fields = {name: own.get(name, dataclasses.field()) for name in hints}
    else:
        fields = {item.name: item for item in dataclasses.fields(cls) if item.name not in extra}
        hints = typing.get_type_hints(cls)
    values = {}
    for key_node, value_node in node.value:
        key = key_node.value
        if key not in fields:
            raise ConfigError(
                f"{_line(key_node, source)}: unknown key {key!r} in {what}; expected one of {', '.join(fields)}"
            )
        if key in values:
            raise ConfigError(f"{_line(key_node, source)}: key {key!r} appears twice in {what}")
        entry = f"{path}.{key}" if path else key
        locations[entry] = _line(key_node, source)
        values[key] = _value(hints[key], fields[key].metadata, value_node, entry, source, locations)
    if cls is Recipe:
        values["stages"] = {name: values.pop(name) for name in list(values) if name not in _RECIPE_FIELDS}
    try:  # cross-field checks (__post_init__) report the section's line
        return cls(**values, **extra)
    except ConfigError as error:
        if str(error).startswith(f"{source}:"):  # it names its own line
            raise
        raise ConfigError(f"{_line(node, source)}: {what}: {error}") from error


def _value(hint, metadata, node: yaml.Node, path: str, source: str, locations: dict[str, str]):
    """Convert one YAML node to the Python value `hint` asks for, or raise naming the line."""
    where = _line(node, source)
    origin = typing.get_origin(hint)
    arguments = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [argument for argument in arguments if argument is not type(None)][0]
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return inner() if dataclasses.is_dataclass(inner) else None  # "distill:" alone: on, defaults
        if dataclasses.is_dataclass(inner) and isinstance(node, yaml.ScalarNode) and node.value == "false":
            return None
        return _value(inner, metadata, node, path, source, locations)
    if dataclasses.is_dataclass(hint):
        if isinstance(node, yaml.ScalarNode) and node.value == "true":
            return hint()  # "tradeoff: true": all defaults
        return _convert(hint, node, path, source, locations)
    if origin is dict:
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"{where}: {path} should be a mapping of LAYER_GLOB: value, e.g. {{'fc*': 0.9}}")
        result = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or not key_node.value:
                raise ConfigError(f"{_line(key_node, source)}: {path} keys should be layer-name globs")
            locations[f"{path}.{key_node.value}"] = _line(key_node, source)
            result[key_node.value] = _value(
                arguments[1], metadata, value_node, f"{path}.{key_node.value}", source, locations
            )
        return result
    if origin is list:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise ConfigError(f"{where}: {path} should be a non-empty list, e.g. [0.5, 0.9]")
        return [_value(arguments[0], metadata, item, path, source, locations) for item in node.value]
    return _scalar(hint, metadata, node, path, where)


def _scalar(hint, metadata, node: yaml.Node, path: str, where: str):
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"{where}: {path} should be a single {hint.__name__}")
    raw = yaml.SafeLoader("").construct_object(node) if node.tag != "tag:yaml.org,2002:str" else node.value
    if hint is float and isinstance(raw, str):
        with contextlib.suppress(ValueError):  # YAML 1.1 reads "5e-4" (no dot) as a string
            raw = float(raw)
    if hint is float and isinstance(raw, int) and not isinstance(raw, bool):
        raw = float(raw)
    if hint is str and isinstance(raw, int) and not isinstance(raw, bool):
        raw = node.value  # "output: 0", a tuple's index, is the text "0"
    if not isinstance(raw, hint) or (hint is int and isinstance(raw, bool)):
        article = "an" if hint is int else "a"
        raise ConfigError(f"{where}: {path} is {node.value!r}; it should be {article} {hint.__name__}")
    if hint is float and not math.isfinite(raw):
        raise ConfigError(f"{where}: {path} is {raw}; it should be a finite number")
    check_value(raw, metadata, f"{where}: {path} is {raw!r}; it")
    return raw


def _recorded(value) -> dict:
    """Settings as plain data (`dataclasses.asdict`), less the `recorded_when_set` fields left at
    their defaults, at every level of nesting."""
    data = dataclasses.asdict(value)
    _drop_unset(value, data)
    return data


def _drop_unset(value, data: dict) -> None:
    for item in dataclasses.fields(value):
        default = item.default_factory() if item.default is dataclasses.MISSING else item.default
        field_value = getattr(value, item.name)
        if item.metadata.get("recorded_when_set") and field_value == default:
            del data[item.name]
        elif dataclasses.is_dataclass(field_value):
            _drop_unset(field_value, data[item.name])
