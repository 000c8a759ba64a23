"""Retraining on several processes: the process group, and what the ranks must share.

Under `torchrun --nproc-per-node N -m deepshrink run RECIPE` (or from Python, under a process
group you initialised) every rank runs the same pipeline on its own shard of the data:

- `data.make_loader` gives each rank a `DistributedSampler` shard of the training split (the
  settings' `batch_size` is the global batch: each rank draws its share) and a strided shard of
  the evaluation splits, and `train.evaluate` sums its statistics over ranks, so every metric is
  the whole split's;
- `train.fit` wraps the model in `DistributedDataParallel`, which broadcasts rank 0's parameters
  and buffers (masks, codes, codebooks) when it is built and all-reduces every gradient, the
  centroids' included;
- statistics gathered from data outside `fit` (Fisher diagonals, a relaxation's gradients) are
  summed over ranks with `sum_over_ranks`, so masks and ranks chosen from them agree;
- after every stage the pipeline calls `synchronize`: each rank's state is hashed, the hashes
  are compared, and where they differ rank 0's state is broadcast and the check repeated;
- only rank 0 writes files and reports (`is_main_process`); caches are used only when every
  rank finds them (`all_ranks`).

gloo serves the CPU, NCCL the GPU; several nodes are torchrun's own flags (`--nnodes`,
`--rdzv-endpoint`). Without a process group, or with one of a single process, every function
here is a no-op, so the single-process path is unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as torch_distributed
from torch import nn

from deepshrink.errors import ConfigError, InternalError

# What torchrun sets in every process it starts.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """A process group of more than one process is initialised.

    Returns:
        Whether several processes take part.
    """
    return (
        torch_distributed.is_available()
        and torch_distributed.is_initialized()
        and torch_distributed.get_world_size() > 1
    )


def rank() -> int:
    """This process's rank (0 without a process group).

    Returns:
        The rank, from 0.
    """
    return torch_distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 without a process group).

    Returns:
        The number of processes, at least 1.
    """
    return torch_distributed.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0, the one that writes files, prints and reports (always true alone).

    Returns:
        Whether this process is rank 0.
    """
    return rank() == 0


def launched_with_several_processes() -> bool:
    """torchrun (or another launcher that sets its variables) started more than one process.

    Returns:
        Whether WORLD_SIZE is above 1.

    Raises:
        ConfigError: WORLD_SIZE is not a whole number.
    """
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} should be a whole number of processes") from None


@contextlib.contextmanager
def process_group_from_environment(device: str | torch.device = "auto") -> Iterator[bool]:
    """Initialise the default process group from torchrun's variables, and destroy it on exit.

    The backend is NCCL when the run's device is a GPU (each process then uses the GPU its
    LOCAL_RANK names) and gloo otherwise. A group that is already initialised is used as it is;
    outside a launcher this does nothing.

    Args:
        device: the run's device ("auto", "cpu", "cuda", ...), which chooses the backend.

    Yields:
        Whether several processes take part.

    Raises:
        ConfigError: a launcher variable is missing, torch lacks torch.distributed, or CUDA lacks
            the GPU LOCAL_RANK names.
    """
    if not launched_with_several_processes() or (
        torch_distributed.is_available() and torch_distributed.is_initialized()
    ):
        yield is_distributed()
        return
    missing = [name for name in LAUNCHER_VARIABLES if name not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE is set but {', '.join(missing)} are not; start several processes with "
            "torchrun --nproc-per-node N -m deepshrink run RECIPE"
        )
    if not torch_distributed.is_available():
        raise ConfigError("this torch was built without torch.distributed; run on one process (plain deepshrink run)")
    backend = "gloo"
    wants_gpu = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
    if wants_gpu:
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                "start at most one process per GPU (--nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    torch_distributed.init_process_group(backend)
    try:
        yield True
    finally:
        torch_distributed.destroy_process_group()


def all_ranks(flag: bool) -> bool:
    """True when `flag` is true on every rank (a cache is used only when every rank has it).

    Args:
        flag: this rank's answer.

    Returns:
        The answers of all ranks joined by "and" (`flag` itself alone).
    """
    if not is_distributed():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_communication_device())
    torch_distributed.all_reduce(value, op=torch_distributed.ReduceOp.MIN)
    return bool(value.item())


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over ranks, in place (float64 on the way, so that the sum does not depend
    on how the ranks' parts round); returned for chaining.

    Args:
        tensor: this rank's part; overwritten with the sum.

    Returns:
        `tensor`.
    """
    if not is_distributed():
        return tensor
    total = tensor.detach().to(_communication_device(), torch.float64)
    torch_distributed.all_reduce(total)
    with torch.no_grad():
        tensor.copy_(total.to(tensor.device, tensor.dtype))
    return tensor


def sum_values_over_ranks(values: list[float]) -> list[float]:
    """Plain numbers (loss sums, counts, a metric's statistics) summed over ranks.

    Args:
        values: this rank's numbers.

    Returns:
        The sums, in the same order (`values` itself alone).
    """
    if not is_distributed():
        return values
    return sum_over_ranks(torch.tensor(values, dtype=torch.float64)).tolist()


def wrap_for_training(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel under a process group (building it broadcasts rank 0's
    parameters and buffers); `model` itself alone, or when it is wrapped already.

    `static_graph`: a weight-shared layer's original weight stays a parameter that its forward
    no longer reads (the codebook and indices make the weight); DDP would otherwise wait for its
    gradient. The graph is the same every step, so DDP learns once which parameters to skip,
    without `find_unused_parameters`' search of the graph at every step.

    Args:
        model: the model to train, already on `device`.
        device: the device the process trains on.

    Returns:
        The module to train through.
    """
    if not is_distributed() or isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    device_ids = None
    if device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, static_graph=True)


def state_digest(model: nn.Module) -> bytes:
    """sha256 of every tensor in `model`'s state_dict (names, dtypes, shapes, bytes).

    Args:
        model: the model to hash.

    Returns:
        The 32-byte digest.
    """
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


def _digests_agree(digest: bytes) -> bool:
    local = torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(_communication_device())
    gathered = [torch.empty_like(local) for _ in range(world_size())]
    torch_distributed.all_gather(gathered, local)
    return all(torch.equal(other, gathered[0]) for other in gathered)


def synchronize(model: nn.Module, what: str) -> bool:
    """Make every rank's `model` state equal to rank 0's, and check that it is.

    Each rank hashes its state (parameters and buffers: weights, masks, codes, codebooks); if
    the hashes differ, rank 0's tensors are broadcast byte for byte and the hashes compared
    again.

    Args:
        model: this rank's model; changed in place when it differs from rank 0's.
        what: names the state in errors ("the prune stage").

    Returns:
        Whether the ranks had to be synchronized (False: they already agreed, as they do when
        every stage is deterministic, and always alone).

    Raises:
        InternalError: the ranks' states differ in shape, or still differ after the broadcast.
    """
    if not is_distributed():
        return False
    if _digests_agree(state_digest(model)):
        return False
    shapes = hashlib.sha256(
        "".join(f"{key}|{t.dtype}|{tuple(t.shape)}" for key, t in sorted(model.state_dict().items())).encode()
    ).digest()
    if not _digests_agree(shapes):
        raise InternalError(f"the processes hold differently shaped models after {what}; this is a bug in deepshrink")
    device = _communication_device()
    for tensor in model.state_dict().values():
        # As raw bytes, so that every dtype (bool, int16 codes) travels the same way.
        buffer = tensor.detach().contiguous().view(-1).view(torch.uint8).to(device)
        torch_distributed.broadcast(buffer, src=0)
        with torch.no_grad():
            tensor.copy_(buffer.to(tensor.device).view(tensor.dtype).view(tensor.shape))
    if not _digests_agree(state_digest(model)):
        raise InternalError(f"the processes still disagree after broadcasting {what}; this is a bug in deepshrink")
    return True


def check_same_file(path: str | os.PathLike, what: str) -> None:
    """Every rank's file at `path` (each its own copy) holds the same bytes; else InternalError
    naming `what`. Alone, the file is not read.

    Args:
        path: this rank's copy of the file.
        what: names the file in the error.

    Raises:
        InternalError: the ranks' files differ.
    """
    if not is_distributed():
        return
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    if not _digests_agree(digest.digest()):
        raise InternalError(f"the processes wrote different {what}; this is a bug in deepshrink")


def _communication_device() -> torch.device:
    """Where collectives' tensors live: the current GPU under NCCL, else the CPU."""
    if torch_distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
