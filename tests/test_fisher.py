import re

import pytest
import torch
import torch.nn.functional as F
from helpers import SmallCNN, small_data

from falcon_prune.costs import CostModel
from falcon_prune.fisher import MemoryBudgetError, as_samples, estimate_bytes, gradient_matrix


def setup():
    model = SmallCNN().eval()
    x, y = small_data(40)
    return model, CostModel.from_model(model, x[:1]), x, y


@pytest.mark.parametrize("m", [1, 4])
def test_rows_equal_autograd_gradients(m):
    model, cm, x, y = setup()
    X = gradient_matrix(model, cm, as_samples((x, y)), 10, m, dtype=torch.float64,
                        progress=False)
    assert X.shape == (10, cm.num_weights) and X.dtype == torch.float64
    weights = [lay.module.weight for lay in cm.layers]
    for j in (0, 9):
        loss = F.cross_entropy(model(x[j * m : (j + 1) * m]), y[j * m : (j + 1) * m])
        ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, weights)])
        assert torch.allclose(X[j], ref.double(), atol=1e-6)


def test_memory_refusal_names_numbers_and_fix():
    model, cm, x, y = setup()
    p = cm.num_weights
    limit = estimate_bytes(12, p, torch.float32) + 1
    with pytest.raises(MemoryBudgetError, match=r"KiB.*n_gradients=(\d+) would fit") as e:
        gradient_matrix(model, cm, as_samples((x, y)), 20, memory_limit=limit, progress=False)
    fit = int(re.search(r"n_gradients=(\d+)", str(e.value)).group(1))
    assert 1 <= fit <= 12 and estimate_bytes(fit, p, torch.float32) <= limit
    X = gradient_matrix(model, cm, as_samples((x, y)), fit, memory_limit=limit, progress=False)
    assert X.shape == (fit, p)
    with pytest.raises(MemoryBudgetError, match="even one gradient would not fit"):
        gradient_matrix(model, cm, as_samples((x, y)), 20, memory_limit=1000, progress=False)


def test_nan_and_shape_and_count_errors():
    model, cm, x, y = setup()
    bad = x.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        gradient_matrix(model, cm, as_samples((bad, y)), 10, progress=False)
    with pytest.raises(ValueError, match="shape"):
        gradient_matrix(model, cm, as_samples((x[:, :, :2, :2].reshape(40, 4), y)), 10,
                        progress=False)
    with pytest.raises(ValueError, match="lower n_gradients"):
        gradient_matrix(model, cm, as_samples((x, y)), 41, progress=False)


def test_model_mode_restored():
    model, cm, x, y = setup()
    model.train()
    gradient_matrix(model, cm, as_samples((x, y)), 5, progress=False)
    assert model.training


def test_batchnorm_uses_running_statistics_and_mode_is_restored():
    from helpers import BatchNormCNN

    torch.manual_seed(0)
    model = BatchNormCNN()
    x, y = small_data(40)
    model.train()
    model(x)  # running statistics differ from any single sample's
    model.train()
    cm = CostModel.from_model(model, x[:1])
    X = gradient_matrix(model, cm, as_samples((x, y)), 4, dtype=torch.float64, progress=False)
    assert model.training
    weights = [lay.module.weight for lay in cm.layers]
    model.eval()
    for j in range(4):
        loss = F.cross_entropy(model(x[j : j + 1]), y[j : j + 1])
        ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, weights)])
        assert torch.allclose(X[j], ref.double(), atol=1e-6)
