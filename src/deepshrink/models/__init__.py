"""Model registry: reference networks by name, and users' own models by factory path."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from deepshrink.errors import ModelError
from deepshrink.models.lenet import LeNet5, LeNet300100
from deepshrink.models.small import FlattenedLeNet5, MobileNet, SqueezeNet
from deepshrink.train import TrainConfig


@dataclass(frozen=True)
class ModelSpec:
    """A registered network: how to build it and how its reference is trained."""

    name: str
    factory: Callable[..., nn.Module]
    description: str
    reference_training: TrainConfig
    # Raised when the architecture or its initialisation changes, so that cached references
    # trained from the old code are not reused (0 leaves the cache key as it always was).
    revision: int = 0


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a model to the registry, so that recipes, checkpoints and files can name it.

    Args:
        spec: the ModelSpec; its name must be new.

    Returns:
        `spec`, so that it can be used as an expression.

    Raises:
        ModelError: a model of that name is already registered.
    """
    if spec.name in _REGISTRY:
        raise ModelError(f"a model named {spec.name!r} is already registered; choose another name")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[ModelSpec]:
    """The registered models, in registration order.

    Returns:
        A list of ModelSpec (name, factory, description, reference training settings).
    """
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_model_spec(name: str) -> ModelSpec:
    """The registered model `name`: its factory, reference training and input shape.

    Args:
        name: a registered model name.

    Returns:
        The ModelSpec.

    Raises:
        ModelError: no model has that name.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(
            f"unknown model {name!r}; registered models are {', '.join(sorted(_REGISTRY))}, "
            "or give your own as package.module:factory"
        ) from None


def is_factory_path(name: str) -> bool:
    """Whether `name` is a package.module:factory path rather than a registered name.

    Args:
        name: a model name or a factory path.

    Returns:
        True for a factory path.
    """
    return ":" in name


def resolve_factory(path: str) -> Callable[..., nn.Module]:
    """Import `package.module:factory` and return the callable.

    Args:
        path: "package.module:factory" (the factory may be dotted: Class.method).

    Returns:
        The callable.

    Raises:
        ModelError: the path is malformed, the module cannot be imported, or the attribute is
            missing or not callable.
    """
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ModelError(f"model factory {path!r} should look like package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelError(
            f"cannot import module {module_name!r} for model factory {path!r}: {error}; "
            "check that it is installed or on PYTHONPATH"
        ) from error
    factory = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelError(f"module {module_name!r} has no attribute {attribute!r} (from model factory {path!r})")
    if not callable(factory):
        raise ModelError(f"{path!r} is not callable; it should be a class or function returning an nn.Module")
    return factory


def build_model(name: str, **config) -> nn.Module:
    """Build a registered model by name, or a user's model from `package.module:factory`.

    Args:
        name: a registered name (see `list_models`) or "package.module:factory", whose factory
            is imported and called (so it runs that code: pass only names you trust).
        **config: keyword arguments for the factory.

    Returns:
        The new nn.Module, freshly initialised.

    Raises:
        ModelError: the name is not registered, the factory cannot be imported or called, or it
            returns something that is not an nn.Module.
    """
    factory = resolve_factory(name) if is_factory_path(name) else get_model_spec(name).factory
    try:
        model = factory(**config)
    except TypeError as error:
        raise ModelError(f"cannot build model {name!r} with config {config}: {error}") from error
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


register_model(
    ModelSpec(
        name="lenet-300-100",
        factory=LeNet300100,
        description="784-300-100-10 fully connected network (Han et al. 2016, Table 2)",
        reference_training=TrainConfig(
            epochs=30, learning_rate=0.05, momentum=0.9, weight_decay=5e-4, batch_size=128, schedule="cosine"
        ),
    )
)
register_model(
    ModelSpec(
        name="lenet-5",
        factory=LeNet5,
        description="Caffe LeNet-5: conv20-pool-conv50-pool-fc500-fc10 (Han et al. 2016, Table 3)",
        reference_training=TrainConfig(
            epochs=20, learning_rate=0.05, momentum=0.9, weight_decay=5e-4, batch_size=128, schedule="cosine"
        ),
    )
)

# The small architectures train like LeNet-5 (their own reference settings, same data).
for _name, _factory, _description in (
    ("squeezenet", SqueezeNet, "SqueezeNet for 28x28: conv32, four Fire modules, 1x1 conv, average pool"),
    ("mobilenet", MobileNet, "MobileNet for 28x28: conv32, four depthwise-separable blocks, average pool, fc"),
    ("lenet-5-flattened", FlattenedLeNet5, "LeNet-5 with flattened (1x1, 5x1, 1x5) convolutions"),
):
    register_model(
        ModelSpec(
            name=_name,
            factory=_factory,
            description=_description,
            reference_training=TrainConfig(
                epochs=15, learning_rate=0.05, momentum=0.9, weight_decay=5e-4, batch_size=128, schedule="cosine"
            ),
            revision=1 if _name == "squeezenet" else 0,  # 1: He initialisation (0 sat at chance)
        )
    )

__all__ = [
    "FlattenedLeNet5",
    "LeNet300100",
    "LeNet5",
    "MobileNet",
    "ModelSpec",
    "build_model",
    "get_model_spec",
    "is_factory_path",
    "list_models",
    "register_model",
    "resolve_factory",
    "SqueezeNet",
]
