"""Where the gradient matrix lives: memory or disk, float64/32/16/bfloat16, and the plan."""

import pytest
import torch
from helpers import same_state, state

import falcon_prune as fp
from falcon_prune.errors import ConfigError, MemoryBudgetError, PathError
from falcon_prune.loss.planning import estimate_bytes, plan_storage, working_bytes
from falcon_prune.loss.quadratic import QuadraticModel
from falcon_prune.loss.storage import (
    NATIVE_BFLOAT16_ENV,
    GradientStore,
    bfloat16_products,
    native_bfloat16,
    self_gram,
)

# relative accuracy of a stored entry, by storage dtype
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def filled(backend, dtype, n=9, p=130, seed=0, scratch=None):
    """A store with rows of very different magnitudes (as per-sample gradients have)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    X *= torch.logspace(-6, 2, n, dtype=torch.float64)[:, None]
    store = GradientStore(n, p, dtype, backend=backend, scratch_dir=scratch,
                          chunk_bytes=4 * n * 17)  # 17 columns per chunk: many chunks
    for a in range(0, n, 4):
        store.write_rows(a, X[a : a + 4])
    return X, store


@pytest.mark.parametrize("backend", ["memory", "disk"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_products_match_dense_reference(backend, dtype, tmp_path):
    X, store = filled(backend, dtype, scratch=tmp_path)
    tol = TOL[dtype]
    assert store.compute_dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    Xs = store.to_tensor().double()
    # every row keeps its relative accuracy, whatever its magnitude (row scaling)
    assert ((Xs - X).abs().amax(1) <= 4 * tol * X.abs().amax(1)).all()
    d = torch.randn(130, dtype=torch.float64)
    y = torch.randn(9, dtype=torch.float64)
    cd = store.compute_dtype
    assert torch.allclose(store.matvec(d.to(cd)).double(), Xs @ d, rtol=1e-5, atol=1e-9)
    assert torch.allclose(store.rmatvec(y.to(cd)).double(), Xs.T @ y, rtol=1e-5, atol=1e-7)
    idx = torch.tensor([0, 3, 16, 17, 18, 60, 129])
    assert torch.allclose(store.gram(idx), Xs[:, idx] @ Xs[:, idx].T, rtol=1e-5, atol=1e-12)
    assert torch.allclose(store.gram(), Xs @ Xs.T, rtol=1e-5, atol=1e-12)
    assert torch.allclose(store.columns(10, 40).double(), Xs[:, 10:40])
    assert torch.allclose(store.column_mean().double(), Xs.mean(0), rtol=1e-5, atol=1e-9)
    assert store.gram(idx[:0]).abs().sum() == 0


@pytest.mark.parametrize("n", [5, 128, 301])
def test_self_gram_equals_the_plain_product(n):
    """Below 128 rows the plain product; from 128 on (odd n too) the mirrored blocks, which
    are exact transposes. A BLAS product is symmetric only to rounding (the two halves of a
    diagonal block may be summed in different orders on some CPUs)."""
    A = torch.randn(n, 70, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    K = self_gram(A)
    assert torch.allclose(K, A @ A.T, rtol=1e-12, atol=1e-12)
    assert torch.allclose(K, K.T, rtol=1e-12, atol=1e-12)
    if n >= 128:
        h = n // 2
        assert torch.equal(K[h:, :h], K[:h, h:].T)


@pytest.mark.parametrize("backend", ["memory", "disk"])
def test_rows_written_in_bfloat16_give_exact_fast_grams(backend, tmp_path, bfloat16_hardware):
    """float32 storage remembers rows that arrived in bfloat16; its Gram (computed on
    bfloat16 units where the CPU has them) equals the float64 product of those values."""
    g = torch.Generator().manual_seed(3)
    R = (torch.randn(300, 200, generator=g) * torch.logspace(-4, 1, 300)[:, None]).bfloat16()
    store = GradientStore(300, 200, backend=backend, scratch_dir=tmp_path,
                          chunk_bytes=4 * 300 * 64)
    store.write_rows(0, R[:150])
    assert not store.bfloat16_values()  # rows 150.. not written in bfloat16 yet
    store.write_rows(150, R[150:])
    assert store.bfloat16_values() and store.bfloat16_values(scaled=False)
    was = torch.backends.mkldnn.matmul.fp32_precision

    def error(K, cols):  # entrywise, relative to the rows' norms (as float32 sums err)
        ref = cols @ cols.T
        norms = ref.diagonal().sqrt()
        return float(((K - ref).abs() / (norms[:, None] * norms[None, :])).max())

    for idx in (None, torch.arange(0, 200, 3)):
        assert error(store.gram(idx), R.double() if idx is None else R.double()[:, idx]) < 1e-6
    assert torch.backends.mkldnn.matmul.fp32_precision == was  # restored
    store.write_rows(0, R[:1].float())  # one float32 row: no longer bfloat16 values
    assert not store.bfloat16_values()
    assert error(store.gram(), R.double()) < 1e-6


def test_which_stores_hold_bfloat16_values():
    R = torch.randn(4, 9).bfloat16()
    half = GradientStore(4, 9, torch.bfloat16)
    half.write_rows(0, R)  # stored divided by the row scale: bfloat16 values only unscaled
    assert half.bfloat16_values(scaled=False) and not half.bfloat16_values(scaled=True)
    # the scale is applied in float32, so the rows come back to bfloat16 rounding
    assert torch.allclose(half.to_tensor(), R.float(), rtol=1e-2, atol=0)
    assert GradientStore.from_tensor(R.float().clone()).bfloat16_values() is False
    for dtype in (torch.float64, torch.float16):
        store = GradientStore(4, 9, dtype)
        store.write_rows(0, R)
        assert not store.bfloat16_values(scaled=False)


def test_bfloat16_products_set_and_restore_the_matmul_precision(bfloat16_hardware):
    matmul = torch.backends.mkldnn.matmul
    was = matmul.fp32_precision
    assert native_bfloat16("cpu") == bfloat16_hardware
    with pytest.raises(RuntimeError), bfloat16_products("cpu"):
        assert matmul.fp32_precision == ("bf16" if bfloat16_hardware else was)
        raise RuntimeError("inside")
    assert matmul.fp32_precision == was
    with bfloat16_products("cpu", enabled=False):
        assert matmul.fp32_precision == was


@pytest.mark.parametrize("value,native", [("0", False), ("off", False), ("1", True),
                                          ("true", True)])
def test_native_bfloat16_can_be_forced_either_way(monkeypatch, value, native):
    monkeypatch.setenv(NATIVE_BFLOAT16_ENV, value)
    assert native_bfloat16("cpu") is native
    monkeypatch.setenv(NATIVE_BFLOAT16_ENV, "maybe")
    with pytest.raises(fp.errors.ConfigError, match="use 0"):
        native_bfloat16("cpu")


def test_disk_store_leaves_no_file_behind(tmp_path):
    _, store = filled("disk", torch.float32, scratch=tmp_path)
    assert list(tmp_path.iterdir()) == []  # unlinked at once; the open handle keeps the data
    assert store.columns(0, 5).shape == (9, 5)
    store.close()


@pytest.mark.parametrize("block", [None, 20])
def test_quadratic_model_is_the_same_on_disk(block, tmp_path):
    X, mem = filled("memory", torch.float32)
    _, disk = filled("disk", torch.float32, scratch=tmp_path)
    w_bar = torch.randn(130)
    mask = torch.rand(130, generator=torch.Generator().manual_seed(3)) < 0.4
    a = QuadraticModel(mem, w_bar, 1e-2, 0.1, block_size=block, chunk=40)
    b = QuadraticModel(disk, w_bar, 1e-2, 0.1, block_size=block, chunk=40)
    assert torch.allclose(a.solve_on_support(mask), b.solve_on_support(mask), atol=1e-5)
    v = torch.randn(130)
    assert torch.allclose(a.grad(v), b.grad(v), atol=1e-4)


def test_plan_picks_memory_then_smaller_dtype_then_disk(tmp_path):
    n, p = 100, 10_000
    f64 = estimate_bytes(n, p, torch.float64)
    plan = plan_storage(n, p, torch.float64, "auto", f64)
    assert (plan.backend, plan.dtype) == ("memory", torch.float64)
    plan = plan_storage(n, p, torch.float64, "auto", f64 - 1)
    assert (plan.backend, plan.dtype) == ("memory", torch.float32)
    assert "float64 would need" in plan.describe()
    plan = plan_storage(n, p, torch.float32, "auto", estimate_bytes(n, p, torch.float32) - 1)
    assert (plan.backend, plan.dtype) == ("memory", torch.float16)
    limit = estimate_bytes(n, p, torch.float16) - 1
    plan = plan_storage(n, p, torch.float32, "auto", limit, tmp_path)
    assert (plan.backend, plan.dtype) == ("disk", torch.float32)
    assert plan.disk_bytes == n * p * 4 and plan.ram_bytes <= limit
    assert "on disk" in plan.describe() and "even in float16" in plan.describe()
    assert plan_storage(n, p, torch.float32, "disk", None, tmp_path).backend == "disk"


def test_plan_refusals_say_what_to_change(tmp_path):
    with pytest.raises(MemoryBudgetError, match="storage='disk'"):
        plan_storage(100, 10_000, torch.float32, "memory", 10**6)
    with pytest.raises(MemoryBudgetError, match="even with the gradient matrix on disk"):
        plan_storage(100, 10_000, torch.float32, "auto", working_bytes(100, 10_000))
    with pytest.raises(ConfigError, match="storage must be one of"):
        plan_storage(10, 10, torch.float32, "cloud")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        plan_storage(10, 10, torch.int32)
    with pytest.raises(ConfigError, match="memory_limit must be a positive"):
        plan_storage(10, 10, torch.float32, "auto", -5)
    with pytest.raises(PathError, match="not a directory"):
        plan_storage(10, 10, torch.float32, "disk", None, tmp_path / "missing")
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(PathError, match="not a directory"):
        plan_storage(10, 10, torch.float32, "disk", None, a_file)


def test_rows_that_do_not_fit_are_refused():
    store = GradientStore(4, 10)
    with pytest.raises(ConfigError, match="do not fit"):
        store.write_rows(0, torch.zeros(2, 11))
    with pytest.raises(ConfigError, match="do not fit"):
        store.write_rows(3, torch.zeros(2, 10))
    with pytest.raises(ConfigError, match="X must be a matrix"):
        GradientStore.from_tensor(torch.zeros(10))


def _disk_limit(n, p):
    """A memory limit under which X (n, p) fits neither in RAM nor in float16, but the
    disk path does."""
    lo = int(working_bytes(n, p) / 0.85) + 1
    hi = estimate_bytes(n, p, torch.float16) - 1
    assert lo < hi
    return (lo + hi) // 2


@pytest.mark.parametrize("block", [None, 16])
def test_small_limit_forces_disk_and_gives_the_in_memory_support(cnn, data, block, tmp_path):
    common = dict(flops=0.4, method="falcon", n_gradients=40, n_validation=60,
                  block_size=block, solver=fp.SolverOptions(max_iter=10), progress=False,
                  scratch_dir=str(tmp_path))
    mem = fp.prune(cnn, data, **common)
    p = mem.num_weights
    disk = fp.prune(cnn, data, memory_limit=_disk_limit(40, p), **common)
    assert "in memory" in mem.details["storage"]
    assert "on disk" in disk.details["storage"]
    assert disk.config.memory_limit == _disk_limit(40, p)
    m1, m2 = fp.masks_of(mem.model), fp.masks_of(disk.model)
    assert set(m1) == {"c1.weight", "c2.weight", "fc.weight"} and set(m1) == set(m2)
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert disk.flops_fraction <= 0.4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_prune_with_each_storage_dtype_meets_budgets(cnn, data, dtype):
    r = fp.prune(cnn, data, flops=0.4, method="falcon", n_gradients=40, n_validation=60,
                 dtype=dtype, storage="memory", solver=fp.SolverOptions(max_iter=10),
                 progress=False)
    assert r.flops_fraction <= 0.4
    assert r.config.dtype == dtype
    assert str(dtype).replace("torch.", "") in r.details["storage"]


def test_prune_memory_storage_refuses_and_leaves_model(cnn, data):
    before = state(cnn)
    with pytest.raises(MemoryBudgetError, match="over the memory limit"):
        fp.prune(cnn, data, flops=0.4, method="falcon", n_gradients=40, storage="memory",
                 memory_limit=10_000, progress=False)
    assert same_state(cnn, before)


def test_storage_settings_are_refused_for_methods_without_gradients(cnn, data):
    with pytest.raises(fp.errors.ConfigError, match="does not use storage"):
        fp.prune(cnn, data, flops=0.4, method="mp", storage="disk", progress=False)
    with pytest.raises(fp.errors.ConfigError, match="storage must be one of"):
        fp.prune(cnn, data, flops=0.4, method="falcon", storage="cloud", progress=False)


def test_plans_per_process_when_rows_are_split(monkeypatch):
    """With world processes each stores at most ceil(n / world) rows (the n x n Gram
    matrices stay whole), the plan says so, and the default limit is shared by the
    processes torchrun starts on the machine."""
    from falcon_prune.loss.planning import default_memory_limit

    n, p = 11, 1000
    assert estimate_bytes(n, p, torch.float32, 2) == 6 * p * 4 + working_bytes(n, p)
    assert estimate_bytes(n, p, torch.float32, 1) == n * p * 4 + working_bytes(n, p)
    limit = estimate_bytes(n, p, torch.float32, 2)
    assert plan_storage(n, p, torch.float32, "memory", limit, world=2).backend == "memory"
    with pytest.raises(MemoryBudgetError, match=r"6 rows per process"):
        plan_storage(n, p, torch.float32, "memory", limit - 1, world=2)
    assert "rows split over 2 processes" in plan_storage(n, p, torch.float32, "auto",
                                                         limit, world=2).describe()
    from falcon_prune.loss import planning

    monkeypatch.setattr(planning, "available_memory", lambda: 10 * 2**30)  # a still machine
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = default_memory_limit()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_memory_limit() == alone // 4


def test_processes_on_one_machine_share_the_scratch_disk(monkeypatch, tmp_path):
    """The scratch files are sparse until written, so each of the processes on a machine
    must count the others' shares when it checks the free space."""
    import shutil
    from collections import namedtuple

    n, p, limit = 10, 1000, 2**30
    share = 5 * p * 4  # ceil(10 / 2) rows of float32
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(0, 0, int(share * 1.5 / 0.9)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # two machines, one process each: fits
    plan = plan_storage(n, p, torch.float32, "disk", limit, str(tmp_path), world=2)
    assert plan.backend == "disk" and plan.disk_bytes == share
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # both on this machine: twice the share
    with pytest.raises(MemoryBudgetError, match="2 processes on this machine"):
        plan_storage(n, p, torch.float32, "disk", limit, str(tmp_path), world=2)
