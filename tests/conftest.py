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


#: seconds of a call on the shape clock: a fixed overhead and a time per multiply-accumulate
CALL_SECONDS, MAC_SECONDS = 2e-5, 1e-9


def shape_seconds(fn) -> float:
    """The shape clock's seconds of one call of ``fn``: by its MACs, never by a timer."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn()
    return CALL_SECONDS + MAC_SECONDS * counter.get_total_flops() / 2


@pytest.fixture
def shape_clock(monkeypatch):
    """Latency measurements that depend on the shapes only (seconds from MACs), so that
    tests of latency budgets pass on any machine, busy or idle: every interleaved timing
    and the layers' times inside the network."""
    from falcon_prune.analysis import site_timing, timing

    def interleaved(runs, repeats, device, repeat_seconds=0.004):
        return {k: shape_seconds(fn) for k, fn in runs.items()}

    def inside(model, call, inputs, layers, repeats, device):
        """The network's seconds, and each module's: MAC_SECONDS per MAC counted between
        its pre- and post-hooks."""
        from torch.utils.flop_counter import FlopCounterMode

        own, start = dict.fromkeys(layers, 0.0), {}
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            def pre(k):
                return lambda m, a: start.__setitem__(k, counter.get_total_flops())

            def post(k):
                return lambda m, a, o: own.__setitem__(k, own[k] + MAC_SECONDS * (
                    counter.get_total_flops() - start[k]) / 2)

            handles = [h for k, m in layers.items() for h in (
                m.register_forward_pre_hook(pre(k)), m.register_forward_hook(post(k)))]
            try:
                call(model, inputs)
            finally:
                for h in handles:
                    h.remove()
        return CALL_SECONDS + MAC_SECONDS * counter.get_total_flops() / 2, own

    monkeypatch.setattr(timing, "interleaved_seconds", interleaved)
    monkeypatch.setattr(timing, "inside_seconds", inside)
    monkeypatch.setattr(site_timing, "interleaved_seconds", interleaved)
    monkeypatch.setattr(site_timing, "inside_seconds", inside)


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
