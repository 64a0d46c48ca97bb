"""Process-group set-up for ``torchrun`` and the collectives through which all ranks decide together.

``beseg train`` run directly is a single process; the same command under
``torchrun --nproc_per_node N`` (or multi-node torchrun) finds ``RANK``/``WORLD_SIZE`` in the
environment and trains with DistributedDataParallel. Only rank 0 writes files and prints.

A distributed run must never have one rank wait in a collective that another rank will not join.
The trainer therefore makes every stop-or-skip decision collectively: each rank reports whether it
failed (and, per step, its loss) through :func:`gather_rows`, and when any rank failed every rank
learns the error text through :func:`gather_texts` and stops with the same message. These control
collectives run on CPU tensors over gloo (a separate gloo group next to NCCL), so they never queue
behind GPU work. The process-group timeout (``train.dist_timeout_s``) is the backstop for a rank
that stops answering without raising (killed, or hung in I/O).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from beseg.errors import BesegError, ConfigError

__all__ = [
    "DistInfo", "DistributedError", "all_reduce_sum", "barrier", "gather_rows", "gather_texts",
    "init_distributed", "shutdown_distributed",
]


class DistributedError(BesegError):
    """A collective failed: another process of the run died, or did not answer within the timeout."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, on ``device``.

    Attributes:
        control_group: the gloo process group for control collectives (CPU tensors); ``None``
            means the default group (which is gloo itself, or there is no group at all).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer (torchrun sets it).") from None


def _pick_device(requested: str, local_rank: int, world_size: int) -> torch.device:
    """The device of this process.

    Raises:
        ConfigError: CUDA requested but unavailable, a GPU index that does not exist, one GPU named
            for several processes, or more processes on this node than GPUs.
    """
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = f"torch {torch.__version__} was built {'with CUDA ' + torch.version.cuda if torch.version.cuda else 'without CUDA'}"
        raise ConfigError(f"train.device={requested!r} but CUDA is not available on this machine ({built}); "
                          "use train.device=cpu or auto.")
    count = torch.cuda.device_count()
    if requested.startswith("cuda:"):
        if world_size > 1:
            raise ConfigError(f"train.device={requested!r} names one GPU, but {world_size} processes were started; "
                              "use train.device=cuda (each process takes the GPU of its LOCAL_RANK).")
        try:
            index = int(requested.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"train.device={requested!r}: the GPU index must be an integer, e.g. cuda:0.") from None
        if not 0 <= index < count:
            raise ConfigError(f"train.device={requested!r} but this machine has {count} CUDA device(s) (0 to {count - 1}).")
        return torch.device("cuda", index)
    if local_rank >= count:
        raise ConfigError(f"LOCAL_RANK={local_rank} but this machine has only {count} CUDA device(s); start at most "
                          f"{count} process(es) per node (torchrun --nproc_per_node {count}).")
    return torch.device("cuda", local_rank)


def init_distributed(requested_device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Args:
        requested_device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (``train.device``).
        timeout_s: how long any collective may wait for the other ranks before it fails
            (``train.dist_timeout_s``); the backstop for a rank that stops without raising.

    Returns:
        A :class:`DistInfo`; ``world_size == 1`` without torchrun.

    Raises:
        ConfigError: see :func:`_pick_device`, or a malformed ``RANK``/``WORLD_SIZE``.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = _pick_device(requested_device, local_rank, world)
    control = None
    if world > 1:
        timeout = timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend, timeout=timeout)
        if dist.get_backend() != "gloo":
            # Decisions travel as CPU tensors: no GPU synchronisation, no queueing behind NCCL kernels.
            control = dist.new_group(backend="gloo", timeout=timeout)
    return DistInfo(rank, world, local_rank, device, control)


@contextmanager
def _collective(info: DistInfo) -> Iterator[None]:
    """Turn a failed collective (torch raises ``RuntimeError``) into a :class:`DistributedError`."""
    try:
        yield
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistributedError(
            f"rank {info.rank} of {info.world_size} lost contact with the other processes (one of them probably "
            f"crashed or was killed, see its output, or did not answer within train.dist_timeout_s): {first[:300]}"
        ) from None


def gather_rows(info: DistInfo, row: Sequence[float]) -> torch.Tensor:
    """Collective: every rank's row of numbers, stacked; the same table on every rank.

    A NaN or Inf in one rank's row stays in that row (the table is a sum of one-row tables, and
    only the owner writes a row).

    Args:
        info: this process.
        row: this rank's numbers (the same length on every rank).

    Returns:
        (world_size, len(row)) float64 CPU tensor; row ``r`` is rank ``r``'s.

    Raises:
        DistributedError: another rank is gone or timed out.
    """
    table = torch.zeros(info.world_size, len(row), dtype=torch.float64)
    table[info.rank] = torch.tensor([float(v) for v in row], dtype=torch.float64)
    if info.distributed:
        with _collective(info):
            dist.all_reduce(table, group=info.control_group)
    return table


def gather_texts(info: DistInfo, text: str | None) -> list[str | None]:
    """Collective: every rank's text (``None`` when it has nothing to say), in rank order.

    Raises:
        DistributedError: another rank is gone or timed out.
    """
    if not info.distributed:
        return [text]
    texts: list[str | None] = [None] * info.world_size
    with _collective(info):
        dist.all_gather_object(texts, text, group=info.control_group)
    return texts


def all_reduce_sum(info: DistInfo, tensor: torch.Tensor) -> torch.Tensor:
    """Collective: ``tensor`` (CPU) summed over ranks, in place; returned for convenience.

    Raises:
        DistributedError: another rank is gone or timed out.
    """
    if info.distributed:
        with _collective(info):
            dist.all_reduce(tensor, group=info.control_group)
    return tensor


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op for one process).

    Raises:
        DistributedError: another rank is gone or timed out.
    """
    if info.distributed:
        with _collective(info):
            dist.barrier(group=info.control_group)


def shutdown_distributed(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
