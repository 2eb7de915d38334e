"""Where the gradient matrix X (n x p) lives, and how the solvers read it.

For ImageNet-size networks X is the largest object of the method (ResNet50: 25.5 M columns;
128 rows are 13 GB in float32). A :class:`GradientStore` holds X

- in memory (CPU or GPU) or on disk (a scratch file streamed in column chunks, never mapped,
  so it costs page cache, not resident memory), and
- in float64, float32, float16 or bfloat16. Half-precision rows are stored divided by their
  largest magnitude (``row_scale``), so float16's range never clips a gradient and its 11
  significant bits are relative to each row.

Solvers only ever see the compute dtype (float64 for float64 storage, float32 otherwise):
products ``X d``, ``X^T y`` and Gram matrices ``X_T X_T^T`` are accumulated chunk by chunk,
and ``columns(a, b)`` returns a converted copy (or a view in the plain in-memory case).

:func:`~falcon_prune.loss.planning.plan_storage` picks the backend and dtype from a memory
limit and says why.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from falcon_prune.errors import ConfigError
from falcon_prune.loss.planning import (
    HALF,
    StoragePlan,
    check_dtype,
    compute_dtype_of,
    disk_chunk_bytes,
    itemsize,
)


def self_gram(A: torch.Tensor) -> torch.Tensor:
    """A A^T (n, n) in A's dtype for A (n, c): the two diagonal blocks and one off-diagonal
    block of the symmetric result, the other mirrored (3/4 of a plain product's work).
    The mirrored blocks are exact transposes; within a diagonal block a BLAS product need
    not be bitwise symmetric (its halves may be summed in different orders), which no
    caller relies on: solves take both triangles, factorisations one."""
    n = A.shape[0]
    if n < 128:
        return A @ A.T
    h = n // 2
    top, bottom = A[:h], A[h:]
    K = torch.empty((n, n), dtype=A.dtype, device=A.device)
    K[:h, :h] = top @ top.T
    K[:h, h:] = top @ bottom.T
    K[h:, :h] = K[:h, h:].T
    K[h:, h:] = bottom @ bottom.T
    return K


@contextlib.contextmanager
def bfloat16_products(device: str | torch.device, enabled: bool = True) -> Iterator[None]:
    """Within the block, float32 matrix products on ``device`` run on bfloat16 units with
    float32 accumulation (oneDNN's 'bf16' float32 precision), where the device is a CPU that
    multiplies bfloat16 natively; elsewhere, or with ``enabled`` False, nothing changes.
    Only for factors that hold bfloat16 values (rows computed in bfloat16): their products
    are then exact and only the order of the float32 sums differs. The setting is restored
    on exit."""
    if not enabled or torch.device(device).type != "cpu" or not native_bfloat16(device):
        yield
        return
    matmul = torch.backends.mkldnn.matmul
    was = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = was


#: environment variable that overrides the detection of native bfloat16 on every device:
#: '0' acts as on hardware without it ('auto' precisions take the model's, Gram products
#: stay in float32), '1' as on hardware with it (bfloat16 is emulated where it is not
#: native: slower, the same results to rounding); unset: detect
NATIVE_BFLOAT16_ENV = "FALCON_PRUNE_NATIVE_BFLOAT16"


def native_bfloat16(device: str | torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 in hardware: a CUDA GPU that supports it
    without emulation, or a CPU with AMX tiles or AVX-512 BF16 (as PyTorch detects them);
    :data:`NATIVE_BFLOAT16_ENV` overrides the answer."""
    forced = os.environ.get(NATIVE_BFLOAT16_ENV, "").strip().lower()
    if forced:
        if forced not in ("0", "1", "false", "true", "off", "on"):
            raise ConfigError(f"{NATIVE_BFLOAT16_ENV}={forced!r}: use 0 (act as without "
                              "native bfloat16) or 1 (as with it), or unset it")
        return forced in ("1", "true", "on")
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(
            including_emulation=False)
    if device.type != "cpu":
        return False
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


class GradientStore:
    """X (n, p) in memory or in a scratch file, read in column chunks.

    Build it empty (``GradientStore(n, p, ...)``, then :meth:`write_rows`) or around an
    existing tensor (:meth:`from_tensor`). All reads return the compute dtype
    (``compute_dtype``) on ``device``.
    """

    def __init__(
        self,
        n: int,
        p: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        backend: str = "memory",
        scratch_dir: str | Path | None = None,
        chunk_bytes: int = 64 * 2**20,
    ):
        self.n, self.p = int(n), int(p)
        self.dtype = check_dtype(dtype)
        self.compute_dtype = compute_dtype_of(self.dtype)
        self.device = torch.device(device)
        self.backend = backend
        # columns per chunk: a chunk in compute dtype is about chunk_bytes
        self.chunk = max(1, min(self.p, chunk_bytes // max(1, 4 * self.n)))
        self.row_scale = (torch.ones(self.n, dtype=self.compute_dtype, device=self.device)
                          if self.dtype in HALF else None)
        self._bf16_rows = torch.zeros(self.n, dtype=torch.bool)  # row j arrived in bfloat16
        self._file = None
        self.data: torch.Tensor | None = None
        self.plan: StoragePlan | None = None  # how it was chosen, when it was planned
        if backend == "memory":
            self.data = torch.empty((self.n, self.p), dtype=self.dtype, device=self.device)
        elif backend == "disk":
            fd, name = tempfile.mkstemp(prefix="falcon_X_", suffix=".bin",
                                        dir=None if scratch_dir is None else str(scratch_dir))
            self._file = os.fdopen(fd, "r+b", buffering=0)
            self.path = name
            try:  # the file disappears with the store (or the process)
                os.unlink(name)
            except OSError:
                pass
            self._file.truncate(self.n * self.p * itemsize(self.dtype))
        else:
            raise ConfigError(f"backend must be 'memory' or 'disk', got {backend!r}")

    @classmethod
    def from_tensor(cls, X: torch.Tensor) -> GradientStore:
        """Wrap an in-memory X (n, p) without copying it."""
        if X.dim() != 2:
            raise ConfigError(f"X must be a matrix (n, p), got shape {tuple(X.shape)}")
        store = cls.__new__(cls)
        store.n, store.p = X.shape
        store.dtype = check_dtype(X.dtype)
        store.compute_dtype = compute_dtype_of(X.dtype)
        store.device = X.device
        store.backend = "memory"
        store.chunk = max(1, min(store.p, (64 * 2**20) // max(1, 4 * store.n)))
        store.row_scale = (torch.ones(store.n, dtype=store.compute_dtype, device=X.device)
                           if X.dtype in HALF else None)
        store._bf16_rows = torch.full((store.n,), X.dtype == torch.bfloat16)
        store._file = None
        store.data = X
        store.plan = None
        return store

    @classmethod
    def from_plan(cls, n: int, p: int, plan: StoragePlan,
                  device: torch.device | str = "cpu") -> GradientStore:
        chunk = disk_chunk_bytes(plan.limit) if plan.backend == "disk" else 64 * 2**20
        return cls(n, p, plan.dtype, device, plan.backend, plan.scratch_dir, chunk)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.p

    @property
    def nbytes(self) -> int:
        return self.n * self.p * itemsize(self.dtype)

    def bfloat16_values(self, scaled: bool = True) -> bool:
        """Whether every column read (with ``scaled``, as :meth:`column_blocks` gives it)
        holds bfloat16 values in float32: bfloat16 storage read without its row scale, or
        float32 storage whose every row was written in bfloat16."""
        if self.compute_dtype != torch.float32:
            return False
        if self.dtype == torch.bfloat16:
            return not scaled
        return self.dtype == torch.float32 and bool(self._bf16_rows.all())

    @property
    def _plain(self) -> bool:
        """In memory and already in the compute dtype: reads are views, products direct."""
        return self.backend == "memory" and self.dtype == self.compute_dtype

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # -- writing ----------------------------------------------------------------------------
    def write_rows(self, start: int, rows: torch.Tensor) -> None:
        """Store rows ``start .. start + len(rows) - 1`` from ``rows`` (r, p), any float dtype
        (bfloat16 rows are remembered: see :meth:`bfloat16_values`)."""
        r = rows.shape[0]
        if rows.shape[1] != self.p or start < 0 or start + r > self.n:
            raise ConfigError(f"rows {start}..{start + r} of width {rows.shape[1]} do not fit "
                             f"X of shape {self.shape}")
        self._bf16_rows[start : start + r] = rows.dtype == torch.bfloat16
        if self.row_scale is not None:
            rows = rows.to(self.compute_dtype)  # divided by the scale in full precision
            scale = rows.abs().amax(1).to(self.compute_dtype).clamp_min(1e-30)
            self.row_scale[start : start + r] = scale.to(self.device)
            rows = rows / scale.to(rows.device, rows.dtype)[:, None]
        if self.backend == "memory":
            self.data[start : start + r] = rows.to(self.device, self.dtype)
            return
        rows = rows.to("cpu", self.dtype)
        size = itemsize(self.dtype)
        for a, b in self.ranges():
            block = memoryview(rows[:, a:b].contiguous().view(torch.uint8).numpy()).cast("B")
            # chunk (a, b) is stored as an (n, b - a) row-major block at offset n * a
            self._file.seek((self.n * a + start * (b - a)) * size)
            done = 0
            while done < len(block):  # a raw write may take fewer bytes than given
                done += self._file.write(block[done:])

    # -- reading ----------------------------------------------------------------------------
    def ranges(self, chunk: int | None = None) -> Iterator[tuple[int, int]]:
        """(a, b) column ranges of ``chunk`` columns (default: the store's own chunks)."""
        step = self.chunk if chunk is None else chunk
        for a in range(0, self.p, step):
            yield a, min(self.p, a + step)

    def _read_stored(self, a: int, b: int) -> torch.Tensor:
        """Stored columns [a, b) as saved (storage dtype, scaled rows), on the CPU for disk."""
        if self.backend == "memory":
            return self.data[:, a:b]
        size = itemsize(self.dtype)
        parts = []
        for ca in range((a // self.chunk) * self.chunk, b, self.chunk):
            cb = min(self.p, ca + self.chunk)
            buf = torch.empty(self.n * (cb - ca) * size, dtype=torch.uint8)
            view = memoryview(buf.numpy()).cast("B")
            self._file.seek(self.n * ca * size)
            got = 0
            while got < len(view):
                k = self._file.readinto(view[got:])
                if not k:
                    raise OSError("the gradient matrix's scratch file is shorter than expected")
                got += k
            block = buf.view(self.dtype).view(self.n, cb - ca)
            parts.append(block[:, max(a, ca) - ca : min(b, cb) - ca])
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def _convert(self, Xs: torch.Tensor, scaled: bool = True) -> torch.Tensor:
        X = Xs.to(self.device, self.compute_dtype)
        if scaled and self.row_scale is not None:
            X = X * self.row_scale[:, None]
        return X

    def columns(self, a: int, b: int) -> torch.Tensor:
        """X[:, a:b] (n, b - a) in the compute dtype on the device (a view when plain)."""
        if self._plain:
            return self.data[:, a:b]
        return self._convert(self._read_stored(a, b))

    def column_blocks(self, idx: torch.Tensor | None = None, scaled: bool = True):
        """(positions, X[:, cols]) per chunk in the compute dtype: all columns in order, or
        the sorted int64 indices ``idx``; ``scaled=False`` leaves half-precision rows
        divided by their ``row_scale``."""
        if idx is None:
            for a, b in self.ranges():
                yield slice(a, b), (self.data[:, a:b] if self._plain
                                    else self._convert(self._read_stored(a, b), scaled))
            return
        if self.backend == "memory":
            for a, b in self.ranges():
                cols = idx[a:b].to(self.data.device)
                if cols.numel():
                    sel = self.data.index_select(1, cols)
                    yield slice(a, b), (sel if self._plain else self._convert(sel, scaled))
            return
        idx_cpu = idx.to("cpu")
        bounds = torch.searchsorted(idx_cpu, torch.arange(0, self.p + self.chunk, self.chunk))
        for k, (a, _) in enumerate(self.ranges()):
            lo, hi = int(bounds[k]), int(bounds[k + 1])
            if hi > lo:
                stored = self._read_stored(a, min(self.p, a + self.chunk))
                sel = stored[:, idx_cpu[lo:hi] - a]
                yield slice(lo, hi), self._convert(sel, scaled)

    def matvec(self, d: torch.Tensor) -> torch.Tensor:
        """X d: d (p,) -> (n,) in the compute dtype."""
        if self._plain:
            return self.data @ d
        out = torch.zeros(self.n, dtype=self.compute_dtype, device=self.device)
        for pos, Xc in self.column_blocks(None, scaled=False):
            out += Xc @ d[pos]
        return out if self.row_scale is None else out * self.row_scale

    def rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        """X^T y: y (n,) -> (p,) in the compute dtype."""
        if self._plain:
            return self.data.T @ y
        ys = y if self.row_scale is None else y * self.row_scale
        out = torch.empty(self.p, dtype=self.compute_dtype, device=self.device)
        for pos, Xc in self.column_blocks(None, scaled=False):
            out[pos] = Xc.T @ ys
        return out

    def gram(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """X[:, idx] X[:, idx]^T (n, n) float64; all columns when ``idx`` is None, else the
        sorted int64 column indices ``idx``."""
        K = torch.zeros((self.n, self.n), dtype=torch.float64, device=self.device)
        if idx is not None and idx.numel() == 0:
            return K
        with bfloat16_products(self.device, self.bfloat16_values(scaled=False)):
            for _, Xc in self.column_blocks(idx, scaled=False):
                K += self_gram(Xc).double()
        if self.row_scale is not None:
            s = self.row_scale.double()
            K *= s[:, None] * s[None, :]
        return K

    def column_map(self, fn, out: torch.Tensor) -> torch.Tensor:
        """``out[..., a:b] = fn(X[:, a:b], a, b)`` for every column chunk (a, b); returns
        ``out`` (..., p). The distributed store deals the chunks out to its ranks."""
        for a, b in self.ranges():
            out[..., a:b] = fn(self.columns(a, b), a, b)
        return out

    def column_mean(self) -> torch.Tensor:
        """The mean row (p,) in the compute dtype."""
        if self._plain:
            return self.data.mean(0)
        return self.rmatvec(torch.full((self.n,), 1.0 / self.n, dtype=self.compute_dtype,
                                       device=self.device))

    def to_tensor(self) -> torch.Tensor:
        """X as one dense tensor (n, p) in the compute dtype (mind the memory)."""
        if self._plain:
            return self.data
        return torch.cat([Xc for _, Xc in self.column_blocks(None, scaled=True)], 1)
