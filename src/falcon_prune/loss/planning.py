"""Planning where the gradient matrix X (n x p) goes: in memory or on disk, in which dtype.

:func:`plan_storage` picks the backend and dtype of X from a memory limit (60 % of the
available RAM by default, shared by the processes ``torchrun`` started on the machine) and
says why (:class:`StoragePlan`): in memory in the requested dtype if it fits, else in a
smaller dtype, else on disk in a scratch directory.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from falcon_prune.errors import ConfigError, MemoryBudgetError, PathError

HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float64, torch.float32, *HALF)
STORAGES = ("auto", "memory", "disk")
GIB = 2**30


def available_memory() -> int:
    """Bytes of physical memory currently available (Linux/macOS), or total if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def local_processes() -> int:
    """How many processes ``torchrun`` started on this machine (``LOCAL_WORLD_SIZE``; 1
    outside torchrun): they share its memory and its scratch disk."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def default_memory_limit() -> int:
    """The default limit for the gradient matrix and solver buffers: 60 % of available RAM,
    shared evenly by the processes ``torchrun`` started on this machine."""
    return int(0.6 * available_memory()) // local_processes()


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The dtype solvers compute in for a storage dtype: float64 stays, the rest is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def working_bytes(n: int, p: int) -> int:
    """The solvers' memory besides X: two n x n float64 Gram matrices and about sixteen
    p-vectors of 8 bytes (iterates, gradients, ILP scores and sort buffers)."""
    return 8 * n * n * 2 + 16 * p * 8


def estimate_bytes(n: int, p: int, dtype: torch.dtype, world: int = 1) -> int:
    """RAM of one process for an in-memory X (n, p) in ``dtype`` whose rows are split over
    ``world`` processes, plus the solvers' working memory (whole n x n Gram matrices)."""
    return -(-n // world) * p * itemsize(dtype) + working_bytes(n, p)


@dataclass(frozen=True)
class StoragePlan:
    """Where and how X is stored: ``backend`` 'memory' or 'disk', the storage ``dtype``,
    the estimated RAM (``ram_bytes``) and file size (``disk_bytes``), and why."""

    backend: str
    dtype: torch.dtype
    ram_bytes: int
    disk_bytes: int
    limit: int
    reason: str
    scratch_dir: str | None = None
    world: int = 1  # processes sharing the rows; the figures are per process

    def describe(self) -> str:
        where = "in memory" if self.backend == "memory" else f"on disk in {self.scratch_dir}"
        disk = f", a {format_bytes(self.disk_bytes)} file" if self.backend == "disk" else ""
        split = (f", rows split over {self.world} processes, figures per process"
                 if self.world > 1 else "")
        return (f"gradient matrix {where} as {str(self.dtype).replace('torch.', '')} "
                f"(about {format_bytes(self.ram_bytes)} of RAM{disk}; limit "
                f"{format_bytes(self.limit)}{split}): {self.reason}")


def format_bytes(b: float) -> str:
    """Bytes as a short human-readable figure (KiB, MiB or GiB)."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{int(b)} B"


def _halvings(n: int) -> list[int]:
    """n, 0.9n, 0.81n, ... down to 1: candidate smaller gradient counts."""
    out, k = [], float(n)
    while k >= 1:
        out.append(int(k))
        k *= 0.9
    return out or [1]


def check_storage(storage: object) -> str:
    """``storage`` if it is one of STORAGES, else a ValueError."""
    if storage not in STORAGES:
        raise ConfigError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    return storage  # type: ignore[return-value]


def check_dtype(dtype: object) -> torch.dtype:
    """``dtype`` if it is a storage dtype of the gradient matrix, else a ValueError."""
    if dtype not in DTYPES:
        raise ConfigError(
            f"dtype must be one of {', '.join(str(d) for d in DTYPES)} for the gradient "
            f"matrix, got {dtype!r}"
        )
    return dtype  # type: ignore[return-value]


def check_scratch_dir(scratch_dir: str | Path | None) -> Path:
    """The directory for an on-disk gradient matrix (default: the system's temporary
    directory), checked to be a writable directory; PathError otherwise."""
    scratch = Path(scratch_dir) if scratch_dir is not None else Path(tempfile.gettempdir())
    if not scratch.is_dir():
        raise PathError(f"scratch_dir {scratch} is not a directory; create it or pick another")
    try:
        with tempfile.TemporaryFile(dir=scratch):
            pass
    except OSError as e:
        raise PathError(f"scratch_dir {scratch} is not writable ({e.strerror}); pass a "
                        "writable scratch_dir") from e
    return scratch


def disk_chunk_bytes(limit: int) -> int:
    """Bytes of one streamed chunk of X (as read, plus its converted copy): small enough to
    stay far below the limit, large enough for efficient reads."""
    return int(min(256 * 2**20, max(4 * 2**10, limit // 16)))


def plan_storage(
    n: int,
    p: int,
    dtype: torch.dtype = torch.float32,
    storage: str = "auto",
    memory_limit: int | None = None,
    scratch_dir: str | Path | None = None,
    world: int = 1,
) -> StoragePlan:
    """Choose where X (n, p) lives under ``memory_limit`` bytes (default: 60 % of the
    available RAM). With ``world`` > 1 processes each stores its share of the rows (at
    most ceil(n / world)), and the plan and the limit are per process.

    ``storage='memory'``: X in RAM in ``dtype``, or :class:`MemoryBudgetError` with the
    numbers and the fixes. ``storage='disk'``: a scratch file in ``scratch_dir`` (default:
    the system's temporary directory). ``storage='auto'``: the first that fits of X in RAM
    in ``dtype``, in float32 (when float64 was asked), in float16 (row-scaled), then on disk
    in ``dtype``; a MemoryBudgetError when even the disk path does not fit."""
    dtype = check_dtype(dtype)
    check_storage(storage)
    limit = default_memory_limit() if memory_limit is None else int(memory_limit)
    if limit <= 0:
        raise ConfigError(f"memory_limit must be a positive number of bytes, got {memory_limit}")
    plan = _choose(n, p, dtype, storage, limit, scratch_dir, world)
    return dataclasses.replace(plan, world=world)


def _choose(n: int, p: int, dtype: torch.dtype, storage: str, limit: int,
            scratch_dir: str | Path | None, world: int) -> StoragePlan:
    """:func:`plan_storage` once its arguments are checked."""
    name = str(dtype).replace("torch.", "")
    need = estimate_bytes(n, p, dtype, world)
    rows = -(-n // world)
    per = f" ({rows} rows per process)" if world > 1 else ""
    if storage in ("memory", "auto") and need <= limit:
        why = "fits the limit" if storage == "auto" else "storage='memory'"
        return StoragePlan("memory", dtype, need, 0, limit, why)
    if storage == "memory":
        fit_n = max((k for k in _halvings(n) if estimate_bytes(k, p, dtype, world) <= limit),
                    default=0)
        fewer = (f"use fewer gradients (n_gradients={fit_n} would fit), " if fit_n else
                 "even one gradient would not fit, so ")
        raise MemoryBudgetError(
            f"the gradient matrix ({n} gradients{per} x {p:,} weights in {name}) and the "
            f"solver's buffers need about {format_bytes(need)}, over the memory limit of "
            f"{format_bytes(limit)}. To fix it: {fewer}use a smaller dtype "
            "(float16/bfloat16), storage='disk' (or 'auto'), or raise memory_limit."
        )
    if storage == "auto":
        for smaller in (torch.float32, torch.float16):
            smaller_need = estimate_bytes(n, p, smaller, world)
            if itemsize(smaller) < itemsize(dtype) and smaller_need <= limit:
                return StoragePlan(
                    "memory", smaller, smaller_need, 0, limit,
                    f"{name} would need {format_bytes(need)}, over the limit; "
                    f"{str(smaller).replace('torch.', '')} fits",
                )
    scratch = check_scratch_dir(scratch_dir)
    file_bytes = rows * p * itemsize(dtype)
    ram = working_bytes(n, p) + disk_chunk_bytes(limit) * 2
    if ram > limit:
        raise MemoryBudgetError(
            f"even with the gradient matrix on disk, the solver needs about "
            f"{format_bytes(ram)} ({n} gradients, {p:,} weights), over the memory limit of "
            f"{format_bytes(limit)}; use fewer gradients or raise memory_limit"
        )
    free = shutil.disk_usage(scratch).free
    # the files are sparse until written: every process on this machine checks now, before
    # any of them has written, so each counts the others' shares too
    sharing = local_processes() if world > 1 else 1
    if file_bytes * sharing > 0.9 * free:
        shared = f" ({sharing} processes on this machine, each as much)" if sharing > 1 else ""
        raise MemoryBudgetError(
            f"the gradient matrix needs {format_bytes(file_bytes)} on disk{shared} but "
            f"{scratch} has {format_bytes(free)} free; pass scratch_dir= on a larger disk, "
            "use fewer gradients or a smaller dtype"
        )
    why = ("storage='disk'" if storage == "disk" else
           f"in memory it would need {format_bytes(estimate_bytes(n, p, torch.float16, world))}"
           " even in float16, over the limit")
    return StoragePlan("disk", dtype, ram, file_bytes, limit, why, str(scratch))
