"""deepshrink: Deep Compression (Han, Mao & Dally, ICLR 2016) for PyTorch.

The public API, as the README uses it:
- the pipeline: `run(model, recipe, data)` -> RunResult (`deepshrink run RECIPE`);
- one stage at a time: `run_stage(model, settings, StageContext(loaders))`, or the stage
  functions `factorize_lowrank`, `prune`, `quantize` and `encode` with their settings classes,
  and the pairs that make a stage permanent: `remove_pruning`, `remove_sharing`;
- files: `save_compressed` / `load_compressed` (.dcz), `load_runtime` (run from the compressed
  form), `save_checkpoint` / `load_checkpoint` / `load_model` (safetensors);
- data and training: `load_data` (IDX images), `load_arrays` (.npz / .safetensors arrays),
  `make_loader`, `Loaders`, `TrainConfig`, `fit`, `evaluate`;
- tasks: `Task` and `Metric` (the loss, metric and distillation of what the model does), and
  `fold_batchnorm` (BatchNorm merged into the layer before it);
- the errors, one hierarchy under DeepshrinkError.
"""

__version__ = "0.1.0"

from deepshrink.batchnorm import fold_batchnorm  # noqa: E402
from deepshrink.checkpoint import Checkpoint, load_checkpoint, load_model, save_checkpoint  # noqa: E402
from deepshrink.compressed import load_compressed, save_compressed  # noqa: E402
from deepshrink.data import DataSplits, load_arrays, load_data, make_loader, read_idx  # noqa: E402
from deepshrink.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    DataError,
    DeepshrinkError,
    FormatError,
    ModelError,
    UnsupportedLayerError,
)
from deepshrink.models import build_model, list_models, register_model  # noqa: E402
from deepshrink.pipeline import RunResult, run  # noqa: E402
from deepshrink.prune.module import remove_pruning  # noqa: E402
from deepshrink.quantize.shared import remove_sharing  # noqa: E402
from deepshrink.recipe import Recipe, load_recipe  # noqa: E402
from deepshrink.references import reference_model  # noqa: E402
from deepshrink.settings import DistillSettings  # noqa: E402
from deepshrink.stages import (  # noqa: E402
    EncodeSettings,
    Loaders,
    LowrankSettings,
    PruneSettings,
    QuantizeSettings,
    StageContext,
    StageResult,
    encode,
    factorize_lowrank,
    prune,
    quantize,
    run_stage,
)
from deepshrink.tasks import Metric, Task  # noqa: E402
from deepshrink.train import TrainConfig, evaluate, fit  # noqa: E402


def __getattr__(name: str):
    # The runtime (numba kernels) loads only when asked for: `import deepshrink` stays light.
    if name == "load_runtime":
        from deepshrink.runtime.load import load_runtime

        return load_runtime
    raise AttributeError(f"module 'deepshrink' has no attribute {name!r}")


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DataSplits",
    "DeepshrinkError",
    "DistillSettings",
    "EncodeSettings",
    "FormatError",
    "Loaders",
    "LowrankSettings",
    "Metric",
    "ModelError",
    "PruneSettings",
    "QuantizeSettings",
    "Recipe",
    "RunResult",
    "StageContext",
    "StageResult",
    "Task",
    "TrainConfig",
    "UnsupportedLayerError",
    "__version__",
    "build_model",
    "encode",
    "evaluate",
    "factorize_lowrank",
    "fit",
    "fold_batchnorm",
    "list_models",
    "load_checkpoint",
    "load_arrays",
    "load_compressed",
    "load_data",
    "load_model",
    "load_recipe",
    "load_runtime",
    "make_loader",
    "prune",
    "quantize",
    "read_idx",
    "reference_model",
    "register_model",
    "remove_pruning",
    "remove_sharing",
    "run",
    "run_stage",
    "save_checkpoint",
    "save_compressed",
]
