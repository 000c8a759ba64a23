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

PRUNE_METHODS = ("magnitude", "dns")
INITS = ("linear", "density", "forgy", "optimal")
LAYOUTS = ("csr", "csc", "dense")
CODERS = ("huffman", "fixed")
OPTIMIZERS = ("sgd", "adam")


def _choices(*values: str) -> dict:
    return {"choices": values}


def _between(low: float | None = None, high: float | None = None, *, open_high: bool = False) -> dict:
    return {"low": low, "high": high, "open_high": open_high}


def _check_fields(settings) -> None:
    """Choices and ranges from the field metadata, for settings built in Python (the YAML reader
    checks the same before, with the line of each value)."""
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if value is None or not item.metadata:
            continue
        values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        for single in values:
            _check_value(single, item.metadata, f"{item.name}={single!r}")


def _check_value(value, metadata, what: str) -> None:
    choices = metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{what} should be one of {', '.join(choices)}")
    low, high = metadata.get("low"), metadata.get("high")
    if isinstance(value, bool) or (low is not None and not isinstance(value, int | float)):
        raise ConfigError(f"{what} should be a number")
    if low is not None and value < low:
        raise ConfigError(f"{what} should be at least {low}")
    if high is not None and (value >= high if metadata.get("open_high") else value > high):
        raise ConfigError(f"{what} should be {'below' if metadata.get('open_high') else 'at most'} {high}")


@dataclass(frozen=True)
class DistillSettings:
    """Retrain against the reference's soft targets as well as the labels (Hinton et al. 2015)."""

    temperature: float = field(default=4.0, metadata=_between(1e-6))
    alpha: float = field(default=0.5, metadata=_between(0.0, 1.0))

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class LowrankSettings:
    """Stage 0 (optional): SVD low-rank factorization at per-layer ranks chosen under a MAC budget."""

    budget: float = field(default=0.5, metadata=_between(1e-6, 1.0))  # fraction of the original MACs
    method: str = field(default="pos", metadata=_choices("cptv", "pos", "relaxed"))
    scheme: str = field(default="zhang", metadata=_choices("zhang", "tai"))
    finetune_epochs: int = field(default=2, metadata=_between(0))
    # method "relaxed": fine-tune each candidate this many epochs and keep the highest validation
    # accuracy; 0 scores the candidates on the training loss right after factorizing instead.
    # None (the default): as many as finetune_epochs, so each candidate is scored on the outcome
    # the final fine-tuning will give it.
    selection_epochs: int | None = field(default=None, metadata=_between(0))
    # method "relaxed": fine-tune each candidate this many times, with as many shuffling seeds, and
    # compare the means. One by default: five did not choose better on the LeNets (BENCHMARKS.md),
    # because the validation images, not the shuffles, limit how finely candidates can be compared.
    selection_seeds: int = field(default=1, metadata=_between(1))
    # method "relaxed": the descent's metric (see lowrank.select_relaxed). "cost" or "both" find
    # lower-loss ranks at tight budgets, for use without fine-tuning.
    projection: str = field(default="euclidean", metadata=_choices("euclidean", "cost", "both"))
    learning_rate: float = field(default=0.01, metadata=_between(1e-12))
    weight_decay: float = field(default=5e-4, metadata=_between(0.0))
    batch_size: int = field(default=128, metadata=_between(1))
    distill: DistillSettings | None = None

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class PruneSettings:
    """Stage 1. Exactly one of `sparsity` / `quality` (per-layer globs) or `global_sparsity`."""

    method: str = field(default="magnitude", metadata=_choices(*PRUNE_METHODS))
    sparsity: dict[str, float] | None = field(default=None, metadata=_between(0.0, 1.0, open_high=True))
    quality: dict[str, float] | None = field(default=None, metadata=_between(0.0))
    global_sparsity: float | None = field(default=None, metadata=_between(0.0, 1.0, open_high=True))
    layers: list[str] | None = None  # the layer globs one global threshold spans (default: all)
    rounds: int = field(default=6, metadata=_between(1))
    retrain_epochs: int = field(default=8, metadata=_between(0))
    learning_rate: float = field(default=0.02, metadata=_between(1e-12))
    weight_decay: float = field(default=5e-4, metadata=_between(0.0))
    batch_size: int = field(default=128, metadata=_between(1))
    finetune_epochs: int = field(default=0, metadata=_between(0))
    distill: DistillSettings | None = None

    def __post_init__(self) -> None:
        _check_fields(self)
        given = [name for name in ("sparsity", "quality", "global_sparsity") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigError(
                "needs exactly one of sparsity: {LAYER_GLOB: S}, quality: {LAYER_GLOB: Q} or "
                f"global_sparsity: S; got {', '.join(given) or 'none'}"
            )
        if self.layers is not None and self.global_sparsity is None:
            raise ConfigError("layers goes with global_sparsity; per-layer targets take sparsity: {LAYER_GLOB: S}")
        if self.method == "dns" and self.global_sparsity is not None:
            raise ConfigError("method: dns needs per-layer sparsity or quality, not global_sparsity")


@dataclass(frozen=True)
class QuantizeSettings:
    """Stage 2: per-layer k-means weight sharing; `bits` maps layer globs to bits (default 8 conv / 5 fc)."""

    bits: dict[str, int] | None = field(default=None, metadata=_between(1, 16))
    init: str = field(default="linear", metadata=_choices(*INITS))
    finetune_epochs: int = field(default=1, metadata=_between(0))
    optimizer: str = field(default="adam", metadata=_choices(*OPTIMIZERS))
    learning_rate: float = field(default=1e-4, metadata=_between(1e-12))
    weight_decay: float = field(default=0.0, metadata=_between(0.0))
    batch_size: int = field(default=128, metadata=_between(1))
    distill: DistillSettings | None = None

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class EncodeSettings:
    """Stage 3: relative-index sparse layout and entropy coding; `index_bits` maps globs to gap widths."""

    index_bits: dict[str, int] | None = field(default=None, metadata=_between(1, 16))
    layout: str = field(default="csr", metadata=_choices(*LAYOUTS))
    coder: str = field(default="huffman", metadata=_choices(*CODERS))

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class TradeoffSettings:
    """The paper's Figure 6: accuracy against compression rate for pruning only, quantization
    only, both, and SVD low-rank. Each point starts from the reference and retrains briefly."""

    sparsities: list[float] = field(
        default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95], metadata=_between(0.0, 1.0, open_high=True)
    )
    bits: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 8], metadata=_between(1, 16))
    combined_bits: int = field(default=5, metadata=_between(1, 16))
    svd_budgets: list[float] = field(  # fractions of the MACs; POS ranks, fp32 factors
        default_factory=lambda: [0.1, 0.2, 0.35, 0.5, 0.7], metadata=_between(1e-6, 1.0)
    )
    retrain_epochs: int = field(default=1, metadata=_between(0))
    learning_rate: float = field(default=0.02, metadata=_between(1e-12))

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class DataSettings:
    train_subset: int | None = field(default=None, metadata=_between(1))
    test_subset: int | None = field(default=None, metadata=_between(1))

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class Recipe:
    """A whole run. Stages left out are skipped: no `prune` section, no pruning."""

    model: str | None = None
    seed: int = 0
    data: DataSettings = field(default_factory=DataSettings)
    lowrank: LowrankSettings | None = None
    prune: PruneSettings | None = None
    quantize: QuantizeSettings | None = None
    encode: EncodeSettings = field(default_factory=EncodeSettings)
    tradeoff: TradeoffSettings | None = None
    # Where each entry came from ("prune.sparsity.fc1" -> "recipe.yaml:12"), for error messages.
    locations: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    source: str = field(default="<recipe>", compare=False, repr=False)

    def section(self, name: str) -> dict | None:
        """A stage's settings as plain data (for cache keys and reports)."""
        value = getattr(self, name)
        return None if value is None else dataclasses.asdict(value)

    def to_dict(self) -> dict:
        return {
            name: (dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
            for name, value in ((item.name, getattr(self, item.name)) for item in dataclasses.fields(self))
            if name not in ("locations", "source")
        }

    def where(self, path: str) -> str:
        """'recipe.yaml:12' for a dotted entry path, or the nearest enclosing entry's location."""
        while path:
            if path in self.locations:
                return self.locations[path]
            path = path.rpartition(".")[0]
        return self.source

    def check_layers(self, layer_names: list[str]) -> None:
        """Every layer glob in the recipe must match at least one of `layer_names`."""
        import fnmatch

        globs = [
            ("prune.sparsity", self.prune and self.prune.sparsity),
            ("prune.quality", self.prune and self.prune.quality),
            ("quantize.bits", self.quantize and self.quantize.bits),
            ("encode.index_bits", self.encode.index_bits),
            ("prune.layers", dict.fromkeys(self.prune.layers or []) if self.prune else None),
        ]
        for path, mapping in globs:
            for pattern in mapping or {}:
                if not any(fnmatch.fnmatchcase(name, pattern) for name in layer_names):
                    raise ConfigError(
                        f"{self.where(f'{path}.{pattern}')}: {path} pattern {pattern!r} matches no layer; "
                        f"the compressible layers are {', '.join(layer_names)}"
                    )


SHIPPED_RECIPES = Path(__file__).resolve().parent / "recipes"


def shipped_recipes() -> list[str]:
    return sorted(path.stem for path in SHIPPED_RECIPES.glob("*.yaml"))


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a YAML recipe file, or a shipped recipe by name ("lenet-5")."""
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
    """Validate YAML `text` into a Recipe; errors name `source` and the line."""
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


def recipe_from_dict(values: dict, source: str = "<dict>") -> Recipe:
    """A Recipe from plain Python data, validated exactly like a file."""
    return parse_recipe(yaml.safe_dump(values, sort_keys=False), source)


def _line(node: yaml.Node, source: str) -> str:
    return f"{source}:{node.start_mark.line + 1}"


def _convert(cls, node: yaml.Node, path: str, source: str, locations: dict[str, str], extra: dict | None = None):
    """An instance of dataclass `cls` from a YAML mapping node, every key and value checked."""
    what = path or "the recipe"
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{_line(node, source)}: {what} should be a mapping of key: value")
    extra = extra or {}
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
    try:  # cross-field checks (__post_init__) report the section's line
        return cls(**values, **extra)
    except ConfigError as error:
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
    if not isinstance(raw, hint) or (hint is int and isinstance(raw, bool)):
        article = "an" if hint is int else "a"
        raise ConfigError(f"{where}: {path} is {node.value!r}; it should be {article} {hint.__name__}")
    if hint is float and not math.isfinite(raw):
        raise ConfigError(f"{where}: {path} is {raw}; it should be a finite number")
    _check_value(raw, metadata, f"{where}: {path} is {raw!r}; it")
    return raw
