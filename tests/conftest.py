"""Fixtures shared by the test modules: small trained models and their data, and the
project's ../shared data (skipped with the reason when it is absent)."""

from pathlib import Path

import pytest
import torch
from helpers import small_data, trained_bn_cnn, trained_cnn

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
# the models here are tiny: one thread is faster than two, and immune to a busy core
torch.set_num_threads(1)


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip the test with the reason."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the project's ../shared data")
    return path


@pytest.fixture(params=["native", "emulated"])
def bfloat16_hardware(request, monkeypatch):
    """Both sides of every branch on native bfloat16, on any CPU: 'native' acts as on
    hardware that multiplies bfloat16 (AMX, AVX-512 BF16, recent GPUs), 'emulated' as on
    hardware that does not (e.g. AVX2 only). Returns whether it is native."""
    from falcon_prune.loss.storage import NATIVE_BFLOAT16_ENV

    monkeypatch.setenv(NATIVE_BFLOAT16_ENV, "1" if request.param == "native" else "0")
    return request.param == "native"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cnn():
    """SmallCNN trained on ``small_data()``, eval mode. Tests must not modify it."""
    return trained_cnn()


@pytest.fixture(scope="session")
def bn_cnn():
    """BatchNormCNN trained on ``small_data()``, eval mode. Tests must not modify it."""
    return trained_bn_cnn()


@pytest.fixture(scope="session")
def data():
    """(x (240, 1, 8, 8), y (240,)) with 4 classes."""
    return small_data()
