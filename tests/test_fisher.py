"""The gradient matrix: rows equal autograd's gradients; storage, memory and data errors."""

import re

import pytest
import torch
import torch.nn.functional as F
from helpers import BatchNormCNN, SmallCNN, small_data
from torch import nn

import falcon_prune as fp
from falcon_prune.analysis.costs import CostModel
from falcon_prune.data.batches import Samples
from falcon_prune.errors import ConfigError, DataError, MemoryBudgetError
from falcon_prune.loss.gradients import VMAP, gradient_matrix, gradient_store
from falcon_prune.loss.planning import estimate_bytes


def setup():
    model = SmallCNN().eval()
    x, y = small_data(40)
    return model, CostModel.from_model(model, x[:1]), x, y


def reference_rows(model, cm, x, y, rows, m=1, loss=F.cross_entropy):
    """Row j by a plain backward pass: the gradient of the mean loss of its m samples."""
    weights = [lay.module.weight for lay in cm.layers]
    out = []
    for j in rows:
        value = loss(model(x[j * m : (j + 1) * m]), y[j * m : (j + 1) * m])
        out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, weights)]))
    return torch.stack(out).double()


@pytest.mark.parametrize("m", [1, 4])
def test_rows_equal_autograd_gradients(m):
    model, cm, x, y = setup()
    X = gradient_matrix(model, cm, Samples((x, y)), 10, m, dtype=torch.float64,
                        progress=False)
    assert X.shape == (10, cm.num_weights) and X.dtype == torch.float64
    assert torch.allclose(X[[0, 9]], reference_rows(model, cm, x, y, (0, 9), m), atol=1e-6)


def test_chunks_columns_and_the_mode_reported():
    model, cm, x, y = setup()
    modes = []
    full = gradient_matrix(model, cm, Samples((x, y)), 12, dtype=torch.float64, chunk=5,
                           progress=False, on_mode=modes.append)
    assert modes == [VMAP]
    assert torch.allclose(full, reference_rows(model, cm, x, y, range(12)), atol=1e-6)
    cols = torch.tensor([0, 7, 53, 54, 300, cm.num_weights - 1])
    part = gradient_matrix(model, cm, Samples((x, y)), 12, dtype=torch.float64,
                           columns=cols, progress=False)
    assert part.shape == (12, 6) and torch.allclose(part, full[:, cols])


def test_store_on_disk_and_in_half_precision_hold_the_same_rows(tmp_path):
    model, cm, x, y = setup()
    ref = gradient_matrix(model, cm, Samples((x, y)), 8, progress=False)
    disk = gradient_store(model, cm, Samples((x, y)), 8, storage="disk",
                          scratch_dir=str(tmp_path), progress=False)
    assert disk.backend == "disk" and disk.plan.backend == "disk"
    assert torch.allclose(disk.to_tensor(), ref)
    half = gradient_store(model, cm, Samples((x, y)), 8, dtype=torch.float16, progress=False)
    assert half.dtype == torch.float16 and half.row_scale is not None
    err = (half.to_tensor() - ref).abs().amax(1) / ref.abs().amax(1)
    assert float(err.max()) < 2e-3  # float16's precision relative to each row


def test_rows_in_bfloat16_are_close_to_float32_and_stored_as_asked():
    model, cm, x, y = setup()
    ref = gradient_matrix(model, cm, Samples((x, y)), 8, 2, progress=False)
    low = gradient_matrix(model, cm, Samples((x, y)), 8, 2, precision=torch.bfloat16,
                          progress=False)
    assert low.dtype == torch.float32 and not torch.equal(low, ref)  # computed differently
    err = (low - ref).norm(dim=1) / ref.norm(dim=1)
    # bfloat16 keeps 8 bits of mantissa: rows of samples the model fits well (small
    # gradients, a softmax close to the target) lose more of theirs
    assert float(err.median()) < 0.02 and float(err.max()) < 0.15
    assert next(model.parameters()).dtype == torch.float32  # the model is not cast


def test_a_model_that_cannot_run_in_bfloat16_gets_a_clear_error():
    class Fixed(torch.nn.Module):  # a float32 constant made inside forward
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(12, 10)

        def forward(self, x):
            return self.fc(x.flatten(1)[:, :12] @ torch.eye(12))

    model = Fixed()
    x, y = torch.randn(16, 12), torch.randint(0, 10, (16,))
    cm = CostModel.from_model(model, x[:1])
    with pytest.raises(ConfigError, match="gradient_precision='model'"):
        gradient_matrix(model, cm, Samples((x, y)), 4, precision=torch.bfloat16, progress=False)
    assert gradient_matrix(model, cm, Samples((x, y)), 4, progress=False).shape[0] == 4
    from falcon_prune.data.tasks import as_task
    from falcon_prune.loss.heldout import HeldOutScorer

    low = HeldOutScorer(model, cm, Samples((x, y)), as_task(None), torch.device("cpu"),
                        precision=torch.bfloat16)
    with pytest.raises(ConfigError, match="held_out_precision='model'"):
        low(model.fc.weight.detach().reshape(-1))


@pytest.mark.parametrize("name, unused_by", [("gradient_precision", "mp"),
                                             ("held_out_precision", "woodfisher")])
def test_precision_settings_are_checked_and_reported(name, unused_by, bfloat16_hardware):
    model, _, x, y = setup()
    r = fp.prune(model, (x, y), flops=0.6, method="falcon", n_gradients=8, n_validation=16,
                 progress=False, **{name: "bfloat16"})
    assert getattr(r.config, name) == "bfloat16" and r.flops_fraction <= 0.6
    assert getattr(fp.defaults("falcon"), name) == "model"
    assert getattr(fp.defaults("falcon++"), name) == "auto"
    rows = {"n_gradients": 8} if unused_by != "mp" else {}
    other = fp.prune(model, (x, y), flops=0.6, method=unused_by, progress=False, **rows)
    assert getattr(fp.defaults(unused_by), name) is None
    assert getattr(other.config, name) is None
    auto = fp.prune(model, (x, y), flops=0.6, method="falcon", n_gradients=8,
                    n_validation=16, progress=False, **{name: "auto"})  # decided at the start
    assert getattr(auto.config, name) == ("bfloat16" if bfloat16_hardware else "model")
    with pytest.raises(ConfigError, match=f"{name} must be one of"):
        fp.prune(model, (x, y), flops=0.6, progress=False, **{name: "float16"})
    with pytest.raises(ConfigError, match=f"does not use {name}"):
        fp.prune(model, (x, y), flops=0.6, method=unused_by, progress=False,
                 **{name: "bfloat16"})


def test_held_out_scores_in_bfloat16_are_close_to_float32_ones():
    from falcon_prune.data.tasks import as_task
    from falcon_prune.loss.heldout import HeldOutScorer

    model = BatchNormCNN().eval()
    x, y = small_data(64)
    cm = CostModel.from_model(model, x[:1])
    w = torch.cat([lay.module.weight.detach().reshape(-1) for lay in cm.layers])
    held, task = Samples((x, y)), as_task(None)
    exact = HeldOutScorer(model, cm, held, task, torch.device("cpu"))
    low = HeldOutScorer(model, cm, held, task, torch.device("cpu"), precision=torch.bfloat16)
    assert low.batches[0][0].dtype == torch.bfloat16 and low.batches[0][1].dtype == torch.int64
    half = w.clone()
    half[::2] = 0
    for v in (w, half):  # the same network's loss within bfloat16's rounding
        assert abs(low(v) - exact(v)) < 0.03 * exact(v)
    bn = HeldOutScorer(model, cm, held, task, torch.device("cpu"), bn_inputs=x,
                       precision=torch.bfloat16)
    bn_exact = HeldOutScorer(model, cm, held, task, torch.device("cpu"), bn_inputs=x)
    assert abs(bn(half) - bn_exact(half)) < 0.03 * bn_exact(half)
    assert next(model.parameters()).dtype == torch.float32  # the model is not cast


def test_bfloat16_scores_and_rows_of_a_model_with_tied_weights():
    """An output layer tied to the embedding (as in GPT-2): the tied weight takes the
    candidate's value under either name, in bfloat16 as in float32."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 8)
            self.mix = nn.Linear(8, 8)
            self.out = nn.Linear(8, 11, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, ids):
            return self.out(torch.tanh(self.mix(self.embed(ids).mean(1))))

    model = Tied().eval()
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 11, (48, 5), generator=g), torch.randint(0, 11, (48,), generator=g)
    for precision in ("model", "bfloat16"):
        r = fp.prune(model, (ids, y), flops=0.6, method="falcon++", stages=2, n_gradients=16,
                     n_validation=16, progress=False, gradient_precision=precision,
                     held_out_precision=precision)
        assert r.config.held_out_precision == precision and r.flops_fraction <= 0.6
        assert r.model.out.weight is not None


def test_dict_batches_and_a_custom_task():
    class KeywordCNN(SmallCNN):
        def forward(self, image):
            return super().forward(image)

    model = KeywordCNN().eval()
    x, y = small_data(20)
    cm = CostModel.from_model(model, {"image": x[:1]})
    target = torch.randn(20, 4)
    task = fp.Task(loss=lambda p, t: ((p - t) ** 2).sum(1))
    X = gradient_matrix(model, cm, Samples({"image": x, "labels": target}), 6, task=task,
                        dtype=torch.float64, progress=False)

    def loss(out, t):
        return ((out - t) ** 2).sum(1).mean()

    assert torch.allclose(X, reference_rows(model, cm, x, target, range(6), loss=loss),
                          atol=1e-6)


def test_a_model_that_does_not_vmap_falls_back_to_backward_passes():
    class DataDependent(SmallCNN):
        def forward(self, x):
            out = super().forward(x)
            return out * 2 if float(x.sum()) > -1e9 else out  # .item() under vmap fails

    model = DataDependent().eval()
    x, y = small_data(12)
    cm = CostModel.from_model(model, x[:1])
    modes = []
    X = gradient_matrix(model, cm, Samples((x, y)), 6, 2, dtype=torch.float64,
                        progress=False, on_mode=modes.append)
    assert len(modes) == 1 and modes[0].startswith("a backward pass per row")
    assert torch.allclose(X, reference_rows(model, cm, x, y, range(6), 2), atol=1e-6)


def test_memory_refusal_names_numbers_and_fix():
    model, cm, x, y = setup()
    p = cm.num_weights
    limit = estimate_bytes(12, p, torch.float32) + 1
    with pytest.raises(MemoryBudgetError, match=r"KiB.*n_gradients=(\d+) would fit") as e:
        gradient_matrix(model, cm, Samples((x, y)), 20, memory_limit=limit, progress=False)
    fit = int(re.search(r"n_gradients=(\d+)", str(e.value)).group(1))
    assert 1 <= fit <= 12 and estimate_bytes(fit, p, torch.float32) <= limit
    X = gradient_matrix(model, cm, Samples((x, y)), fit, memory_limit=limit, progress=False)
    assert X.shape == (fit, p)
    with pytest.raises(MemoryBudgetError, match="even one gradient would not fit"):
        gradient_matrix(model, cm, Samples((x, y)), 20, memory_limit=1000, progress=False)


def test_nan_and_shape_and_count_errors():
    model, cm, x, y = setup()
    bad = x.clone()
    bad[3] = float("nan")
    with pytest.raises(DataError, match="NaN or inf"):
        gradient_matrix(model, cm, Samples((bad, y)), 10, progress=False)
    with pytest.raises(DataError, match="shape"):
        gradient_matrix(model, cm, Samples((x[:, :, :2, :2].reshape(40, 4), y)), 10,
                        progress=False)
    with pytest.raises(DataError, match="lower n_gradients"):
        gradient_matrix(model, cm, Samples((x, y)), 41, progress=False)
    with pytest.raises(DataError, match="lower n_gradients"):
        gradient_matrix(model, cm, Samples((x, y)), 11, 4, progress=False)


def test_bad_counts_and_constant_loss_are_refused():
    model, cm, x, y = setup()
    with pytest.raises(ConfigError, match="n_gradients must be a positive integer"):
        gradient_matrix(model, cm, Samples((x, y)), 0, progress=False)
    with pytest.raises(ConfigError, match="samples_per_gradient"):
        gradient_matrix(model, cm, Samples((x, y)), 4, 0, progress=False)
    constant = fp.Task(loss=lambda p, t: p.sum(1) * 0)
    with pytest.raises(DataError, match="every gradient is zero"):
        gradient_matrix(model, cm, Samples((x, y)), 4, task=constant, progress=False)


def test_model_mode_restored():
    model, cm, x, y = setup()
    model.train()
    gradient_matrix(model, cm, Samples((x, y)), 5, progress=False)
    assert model.training


def test_batchnorm_uses_running_statistics_and_mode_is_restored():
    model = BatchNormCNN()
    x, y = small_data(40)
    model.train()
    model(x)  # running statistics differ from any single sample's
    cm = CostModel.from_model(model, x[:1])
    X = gradient_matrix(model, cm, Samples((x, y)), 4, dtype=torch.float64, progress=False)
    assert model.training
    model.eval()
    assert torch.allclose(X, reference_rows(model, cm, x, y, range(4)), atol=1e-6)
