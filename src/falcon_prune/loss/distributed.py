"""Scale-out over the processes of a ``torch.distributed`` group (started by ``torchrun``).

When a process group with more than one rank is initialised, a run splits the rows of the
gradient matrix X (n x p) over the ranks: rank r computes and stores only rows
``share(n)`` of X (its samples), so X's memory per rank is about 1/world of the
single-process figure. :class:`ShardedStore` gives the solvers the same interface as
:class:`~falcon_prune.storage.GradientStore` with global meaning (``n`` is the global row
count, ``X d`` is the whole (n,) vector), and forms every product with collectives:

- ``X d``: local rows, then an all-gather of the (n,) result;
- ``X^T y``: the local rows' part, then an all-reduce (sum) of the (p,) result;
- Gram matrices ``X_T X_T^T`` (n x n): each rank forms its row block against the gathered
  column chunk, then the blocks are gathered;
- column-wise maps (saliencies): the column chunks are dealt out to the ranks, each rank
  gathers the rows of its chunks only, and the (p,) results are summed.

Every rank then holds bit-identical solver inputs, so the integer program and the held-out
choice (whose losses are summed over the ranks' shares of the held-out samples) give the
same mask everywhere; the step's result is broadcast from rank 0 as a final guarantee.
Collectives run on the CPU for gloo and on the current CUDA device for NCCL.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from falcon_prune.errors import DataError, ModelError
from falcon_prune.loss.planning import StoragePlan
from falcon_prune.loss.storage import GradientStore, bfloat16_products


@dataclass(frozen=True)
class Ranks:
    """This process's ``rank`` among ``world`` processes (``world == 1``: no group)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The default process group's rank and size, or a single process when
        ``torch.distributed`` is unavailable or not initialised."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """[start, stop) of ``rank``'s share of n items (default: this rank): contiguous,
        the first ``n % world`` ranks one more."""
        r = self.rank if rank is None else rank
        base, extra = divmod(n, self.world)
        start = r * base + min(r, extra)
        return start, start + base + (1 if r < extra else 0)

    def sizes(self, n: int) -> list[int]:
        """Every rank's share of n items, in rank order."""
        return [b - a for a, b in (self.bounds(n, r) for r in range(self.world))]

    # -- collectives (no-ops for one process) ------------------------------------------------
    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.active:
            dist.barrier()

    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        if dist.get_backend() == "nccl":
            return t.to(torch.device("cuda", torch.cuda.current_device()))
        return t.cpu()

    def _reduced(self, t: torch.Tensor, op) -> torch.Tensor:
        """All-reduce; in place when ``t`` already lies on the communication device (the
        callers pass temporaries), so no second copy of a long vector is made."""
        if not self.active:
            return t
        c = self._comm(t).contiguous()
        dist.all_reduce(c, op=op)
        return c.to(t.device)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``t`` over the ranks (identical on every rank)."""
        return self._reduced(t, dist.ReduceOp.SUM)

    def all_max(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum of ``t`` over the ranks (identical on every rank)."""
        return self._reduced(t, dist.ReduceOp.MAX)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on at least one rank (the same answer on every rank)."""
        if not self.active:
            return bool(flag)
        return bool(self.all_max(torch.tensor([int(bool(flag))])).item())

    def raise_together(self, failure: Exception | None, elsewhere: Exception) -> None:
        """Raise ``failure`` where this rank has one, ``elsewhere`` on the ranks that have
        none while another rank does, nothing when no rank failed: a rank that went on
        alone would wait for the others in its next collective."""
        if self.any(failure is not None):
            raise failure or elsewhere

    def same(self, value: int) -> bool:
        """Whether the integer ``value`` (|value| < 2**63) is the same on every rank."""
        if not self.active:
            return True
        mine = torch.tensor([value, -value], dtype=torch.int64)
        return bool((self.all_max(mine.clone()) == mine).all())  # max == min over the ranks

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``t`` on every rank (same shape and dtype on every rank)."""
        if not self.active:
            return t
        as_bool = t.dtype == torch.bool
        c = self._comm(t.to(torch.uint8) if as_bool else t).contiguous()
        dist.broadcast(c, src)
        c = c.to(t.device)
        return c.bool() if as_bool else c

    def _padded(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """``local`` rows padded with zeros to the largest share (collectives need equal
        sizes), on the communication device; ``local`` itself (no copy) when it already
        is the largest share, contiguous, on that device."""
        share = -(-n // self.world)
        c = self._comm(local)
        if local.shape[0] == share and c.is_contiguous():
            return c
        pad = c.new_zeros((share, *local.shape[1:]))
        pad[: local.shape[0]] = c
        return pad

    def _joined(self, parts: list[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
        return torch.cat([p[:k] for p, k in zip(parts, self.sizes(n), strict=True)]).to(device)

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """The (n, ...) tensor whose rows ``bounds(n, r)`` are rank r's ``local`` rows."""
        if not self.active:
            return local
        return torch.cat(self.gather_parts(local, n)).to(local.device)

    def gather_parts(self, local: torch.Tensor, n: int) -> list[torch.Tensor]:
        """Every rank's ``local`` rows, one tensor per rank in rank order (rank r's
        ``sizes(n)[r]`` rows, on the communication device): :meth:`gather_rows` without the
        joined copy, for callers that can use the parts one by one."""
        if not self.active:
            return [local]
        pad = self._padded(local, n)
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad)
        return [p[:k] for p, k in zip(parts, self.sizes(n), strict=True)]

    def gather_to(self, owner: int, local: torch.Tensor, n: int) -> torch.Tensor | None:
        """Like :meth:`gather_rows`, but only rank ``owner`` receives the (n, ...) result
        (None elsewhere)."""
        if not self.active:
            return local
        pad = self._padded(local, n)
        parts = ([torch.empty_like(pad) for _ in range(self.world)] if self.rank == owner
                 else None)
        dist.gather(pad, parts, dst=owner)
        return None if parts is None else self._joined(parts, n, local.device)


def fingerprint(tensors: Iterable[torch.Tensor]) -> int:
    """A 63-bit hash of the tensors' dtypes, shapes and values, in order."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return int.from_bytes(h.digest(), "little") >> 1


def require_same_model(ranks: Ranks, model: torch.nn.Module) -> None:
    """Refuse (ModelError) when the model's parameters and buffers differ between ranks:
    every rank must prune the same network (a collective; call it on every rank)."""
    if ranks.active and not ranks.same(
            fingerprint(t for _, t in sorted(model.state_dict().items()))):
        raise ModelError(
            "the model's weights differ between the torch.distributed ranks; every rank must "
            "pass the same network (load the same checkpoint on each rank, or seed "
            "identically before building it)")


def require_same_samples(ranks: Ranks, tensors: Iterable[torch.Tensor]) -> None:
    """Refuse (DataError) when the drawn samples differ between ranks: every rank must
    pass the same data, of which each computes its own share of the gradients."""
    if ranks.active and not ranks.same(fingerprint(tensors)):
        raise DataError(
            "the samples drawn differ between the torch.distributed ranks; every rank must "
            "pass the same data and seed (the library splits the work itself; do not "
            "shard the data per rank)")


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by ``torchrun`` (its environment
    names a world of more than one process)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@contextmanager
def process_group(device: str | torch.device = "cpu") -> Iterator[torch.device]:
    """Under ``torchrun``, initialise the default process group for the duration (gloo for
    a CPU ``device``, NCCL for CUDA, where each process takes GPU ``LOCAL_RANK`` unless the
    device names one) and yield the device this process uses; otherwise, or when a group
    already exists, yield ``device`` unchanged and do nothing."""
    dev = torch.device(device)
    if not launched_by_torchrun() or not dist.is_available() or dist.is_initialized():
        yield dev
        return
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))
                           if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield dev
    finally:
        dist.destroy_process_group()


class ShardedStore:
    """X (n, p) whose rows ``ranks.bounds(n)`` live on this rank in ``local`` (a
    :class:`GradientStore` of those rows, in memory or on disk, any storage dtype); the
    other rows live on the other ranks. Products have their global meaning and are the same
    on every rank. Every method is a collective: all ranks must call it in the same order."""

    def __init__(self, local: GradientStore, n: int, ranks: Ranks):
        self.local, self.ranks, self.n, self.p = local, ranks, int(n), local.p
        self.start, self.stop = ranks.bounds(self.n)
        if local.n != self.stop - self.start:
            raise ValueError(f"rank {ranks.rank} holds {local.n} rows, not its share "
                             f"{self.start}..{self.stop} of {self.n}")
        self.dtype, self.compute_dtype = local.dtype, local.compute_dtype
        self.device, self.backend = local.device, local.backend
        # columns per gathered chunk: all n rows of it take about what one process's chunk
        # takes, so gathering adds no more memory than one chunk (as padded parts and joined)
        self.chunk = max(1, local.chunk // ranks.world)
        self.plan: StoragePlan | None = local.plan

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.p

    @property
    def nbytes(self) -> int:
        """Bytes of this rank's rows."""
        return self.local.nbytes

    def close(self) -> None:
        self.local.close()

    def write_rows(self, start: int, rows: torch.Tensor) -> None:
        """Store global rows ``start ..`` (all within this rank's share)."""
        self.local.write_rows(start - self.start, rows)

    def ranges(self, chunk: int | None = None) -> Iterator[tuple[int, int]]:
        return self.local.ranges(self.chunk if chunk is None else chunk)

    def columns(self, a: int, b: int) -> torch.Tensor:
        """X[:, a:b] (n, b - a): every rank's rows, gathered."""
        return self.ranks.gather_rows(self.local.columns(a, b), self.n)

    def matvec(self, d: torch.Tensor) -> torch.Tensor:
        """X d (n,) from the local rows' part, gathered."""
        return self.ranks.gather_rows(self.local.matvec(d), self.n)

    def rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        """X^T y (p,): the local rows' part, summed over the ranks."""
        return self.ranks.all_sum(self.local.rmatvec(y[self.start:self.stop]))

    def column_mean(self) -> torch.Tensor:
        return self.rmatvec(torch.full((self.n,), 1.0 / self.n, dtype=self.compute_dtype,
                                       device=self.device))

    def gram(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """X[:, idx] X[:, idx]^T (n, n) float64: this rank's row block against every chunk
        of gathered columns, then the row blocks gathered."""
        block = torch.zeros((self.stop - self.start, self.n), dtype=torch.float64,
                            device=self.device)
        bounds = [0, *itertools.accumulate(self.ranks.sizes(self.n))]
        if idx is not None and idx.numel() == 0:
            return self.ranks.gather_rows(block, self.n)
        # every rank computes its rows the same way, so its own rows say whether all are
        # bfloat16 values
        with bfloat16_products(self.device, self.local.bfloat16_values(scaled=True)):
            for _, Xb in self.local.column_blocks(idx):
                for j in range(0, Xb.shape[1], self.chunk):
                    Xc = Xb[:, j:j + self.chunk]
                    parts = self.ranks.gather_parts(Xc, self.n)  # no joined copy
                    for r, part in enumerate(parts):
                        block[:, bounds[r]:bounds[r + 1]] += (
                            Xc @ part.to(Xc.device).T).double()
        return self.ranks.gather_rows(block, self.n)

    def column_map(self, fn: Callable[[torch.Tensor, int, int], torch.Tensor],
                   out: torch.Tensor) -> torch.Tensor:
        """``out[..., a:b] = fn(X[:, a:b], a, b)`` for every column chunk; chunk k is
        computed by rank k % world (which alone gathers its rows), then shared."""
        out.zero_()
        for k, (a, b) in enumerate(self.ranges()):
            owner = k % self.ranks.world
            Xc = self.ranks.gather_to(owner, self.local.columns(a, b), self.n)
            if Xc is not None:
                out[..., a:b] = fn(Xc, a, b)
        return self.ranks.all_sum(out)

    def to_tensor(self) -> torch.Tensor:
        """X (n, p) gathered on every rank (mind the memory)."""
        return self.ranks.gather_rows(self.local.to_tensor(), self.n)
