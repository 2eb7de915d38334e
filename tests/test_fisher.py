import pytest
import torch
import torch.nn.functional as F
from helpers import SmallCNN, small_data

from falcon_prune.costs import CostModel
from falcon_prune.fisher import MemoryBudgetError, as_samples, gradient_matrix


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
    with pytest.raises(MemoryBudgetError, match=r"GiB.*n_gradients=\d+ would fit"):
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
