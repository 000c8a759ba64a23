"""deepshrink: Deep Compression (Han, Mao & Dally, ICLR 2016) for PyTorch."""

from deepshrink.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from deepshrink.data import DataSplits, load_data, make_loader, read_idx
from deepshrink.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DeepshrinkError,
    FormatError,
    ModelError,
    UnsupportedLayerError,
)
from deepshrink.models import build_model, list_models, register_model
from deepshrink.pipeline import RunResult, compress
from deepshrink.recipe import Recipe, load_recipe
from deepshrink.references import reference_model
from deepshrink.stages import Loaders
from deepshrink.train import TrainConfig, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DataSplits",
    "DeepshrinkError",
    "FormatError",
    "Loaders",
    "ModelError",
    "Recipe",
    "RunResult",
    "TrainConfig",
    "UnsupportedLayerError",
    "__version__",
    "build_model",
    "compress",
    "evaluate",
    "fit",
    "list_models",
    "load_checkpoint",
    "load_data",
    "load_recipe",
    "make_loader",
    "read_idx",
    "reference_model",
    "register_model",
    "save_checkpoint",
]
