"""Process-group set-up for ``torchrun`` and the collectives through which all ranks decide together.

``beseg train`` run directly is a single process; the same command under
``torchrun --nproc_per_node N`` (or multi-node torchrun) finds ``RANK``/``WORLD_SIZE`` in the
environment and trains with DistributedDataParallel. Only rank 0 writes files and prints.

Under SLURM's ``srun -n N`` (no torchrun) each task finds SLURM's variables instead, and
:func:`launch_env` maps them as torchrun would set its own: ``SLURM_PROCID`` -> rank,
``SLURM_LOCALID`` -> local rank, ``SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``) -> world size,
the first host of ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``) -> the rendezvous host,
and a port derived from the job and step ids (``MASTER_PORT`` when set). So ``srun -n N beseg
train ...`` is one N-rank run, on one node or several. torchrun's variables win when both are set.

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
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from beseg.errors import BesegError, ConfigError

__all__ = [
    "DistInfo", "DistributedError", "LaunchEnv", "first_host", "launch_env", "all_reduce_sum", "barrier", "gather_rows", "gather_texts",
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


def _env_int(env, name: str, default: int) -> int:
    raw = env.get(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer (torchrun or srun sets it).") from None


@dataclass(frozen=True)
class LaunchEnv:
    """How this process was started: its rank among ``world_size`` processes, and where they meet.

    Attributes:
        source: ``torchrun``, ``slurm`` (``srun`` without torchrun) or ``single``.
        master_addr, master_port: the rendezvous (None: torchrun's own ``env://`` variables).
    """

    rank: int
    world_size: int
    local_rank: int
    source: str
    master_addr: str | None = None
    master_port: int | None = None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu1`` -> ``gpu07`` (zero padding kept).

    Raises:
        ConfigError: an empty or malformed list.
    """
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        if not prefix:
            raise ConfigError(f"SLURM node list {nodelist!r} is empty.")
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    if not first.isdigit():
        raise ConfigError(f"SLURM node list {nodelist!r}: cannot read its first host.")
    return prefix + first


def launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Rank, world size and rendezvous of this process: torchrun's variables, else SLURM's (``srun``), else one process.

    Args:
        environ: the environment (default ``os.environ``).

    Raises:
        ConfigError: a malformed variable.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env or "LOCAL_RANK" in env:
        return LaunchEnv(_env_int(env, "RANK", 0), _env_int(env, "WORLD_SIZE", 1), _env_int(env, "LOCAL_RANK", 0),
                         "torchrun")
    tasks_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    # Only inside an srun step: the batch script itself also carries SLURM_NTASKS but is one process.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and _env_int(env, tasks_var, 1) > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodes:
            raise ConfigError("srun started several tasks but SLURM_JOB_NODELIST is not set; start with torchrun.")
        if "MASTER_PORT" in env:
            port = _env_int(env, "MASTER_PORT", 29500)
        else:  # the same for every task of the step, different for concurrent steps and jobs
            port = 20000 + (_env_int(env, "SLURM_JOB_ID", 0) * 17 + _env_int(env, "SLURM_STEP_ID", 0)) % 20000
        return LaunchEnv(_env_int(env, "SLURM_PROCID", 0), _env_int(env, tasks_var, 1),
                         _env_int(env, "SLURM_LOCALID", 0), "slurm", env.get("MASTER_ADDR") or first_host(nodes), port)
    return LaunchEnv(0, 1, 0, "single")


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
    launch = launch_env()
    world, rank, local_rank = launch.world_size, launch.rank, launch.local_rank
    device = _pick_device(requested_device, local_rank, world)
    control = None
    if world > 1:
        timeout = timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            if launch.master_addr is not None:  # srun: the rendezvous torchrun would have set up
                dist.init_process_group(backend=backend, timeout=timeout, rank=rank, world_size=world,
                                        init_method=f"tcp://{launch.master_addr}:{launch.master_port}")
            else:
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
