"""Every bad input a user can give: a library error with a message that says what to do,
or a correct result, and the user's model left as it was. The command line prints one line
and exits with 2 for these, checks every path before any work, and keeps the traceback of
an internal error."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SmallCNN, global_methods, same_state, small_data, state
from torch import nn

import falcon_prune as fp
from falcon_prune import cli
from falcon_prune.errors import (
    BudgetError,
    CheckpointError,
    ConfigTypeError,
    DataError,
    DataTypeError,
    FalconPruneError,
    MissingFileError,
    ModelError,
    ModelTypeError,
    PathError,
)
from falcon_prune.models import MLPNet, load_checkpoint

FALCON = dict(n_gradients=60, n_validation=60, progress=False)


def check_refusal(model, exc, match, **kw):
    """prune refuses with ``exc`` (a FalconPruneError) and leaves the model as it was."""
    before = state(model)
    with pytest.raises(exc, match=match) as info:
        fp.prune(model, **kw)
    assert isinstance(info.value, FalconPruneError)
    assert same_state(model, before)


# -- models and tasks ----------------------------------------------------------------------
class TokenClassifier(nn.Module):
    """Token ids (N, T) -> a ModelOutput-like dict with 'logits' (N, 3)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids).mean(1)
        return {"logits": self.out(torch.relu(self.fc(h))), "pooled": h}


def token_data(n=160):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (n, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 3}


@pytest.mark.parametrize("method", global_methods())
def test_integer_token_inputs_prune_with_every_method(method):
    model, data = TokenClassifier().eval(), token_data()
    before = state(model)
    kw = {} if method in ("mp", "mp_flops") else {"n_gradients": 40}
    kw.update({"n_validation": 40} if method in ("falcon", "falcon++") else {})
    kw.update({"stages": 2} if method == "falcon++" else {})
    r = fp.prune(model, data, flops=0.5, method=method, progress=False, **kw)
    assert r.flops_fraction <= 0.5 and same_state(model, before)


def test_dict_outputs_with_a_custom_loss_work_in_the_held_out_selection():
    model, data = TokenClassifier().eval(), token_data()
    losses = lambda pred, y: nn.functional.cross_entropy(pred, y, reduction="none")  # noqa: E731
    r = fp.prune(model, data, flops=0.5, task=losses, **FALCON)
    assert r.details["selection"] == "held-out loss on 60 samples"
    assert r.config.task.name == "custom"


def test_dict_output_without_logits_is_refused_with_the_fix():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 4)

        def forward(self, x):
            return {"a": self.fc(x.flatten(1)), "b": self.fc(x.flatten(1)) * 2}

    check_refusal(TwoHeads(), ModelError, "output=", data=small_data(), flops=0.5, **FALCON)


@pytest.mark.parametrize("outputs", [1])
def test_one_output_models_under_the_classification_default_are_refused(outputs):
    reg = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, outputs))
    x, _ = small_data()
    check_refusal(reg, ModelError, "regression", data=(x, x.sum((1, 2, 3))), flops=0.5,
                  **FALCON)
    r = fp.prune(reg, (x, x.sum((1, 2, 3))), flops=0.5, task="regression", **FALCON)
    assert r.flops_fraction <= 0.5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_models_of_every_dtype_prune_with_falcon(cnn, data, dtype):
    model = fp.clone_model(cnn).to(dtype)
    x, y = data
    r = fp.prune(model, (x.to(dtype), y), flops=0.4, **FALCON)
    assert r.flops_fraction <= 0.4 and r.model.c1.weight.dtype == dtype


def test_multihead_attention_is_never_free():
    model = nn.Sequential()
    model.mha = nn.MultiheadAttention(8, 2, batch_first=True)
    cm = fp.CostModel.from_model(model.mha, (torch.randn(1, 5, 8),) * 3)
    names = [lay.name for lay in cm.layers]
    assert names == ["in_proj_weight", "out_proj.weight"]
    assert [lay.cost for lay in cm.layers] == [5, 5]  # one MAC per token, 5 tokens
    assert cm.fixed_macs == 2 * 5 * 5 * 8  # Q K^T and A V: (5 x 5) scores x 8 channels


# -- data ----------------------------------------------------------------------------------
def test_labels_out_of_range_among_the_held_out_samples(cnn, data):
    x, y = data
    bad = y.clone()
    bad[100] = 7  # with sampling='first', samples 60..119 are the held-out ones
    check_refusal(cnn, DataError, r"labels must be class indices in \[0, 3\].*7", data=(x, bad),
                  flops=0.5, sampling="first", **FALCON)
    check_refusal(cnn, DataError, "class indices", data=(x, bad - 10), flops=0.5, method="mp",
                  sampling="first", progress=False)


def test_labels_shaped_n_by_one_work_like_labels_shaped_n(cnn, data):
    x, y = data
    a = fp.prune(cnn, (x, y[:, None]), flops=0.4, **FALCON)
    b = fp.prune(cnn, (x, y), flops=0.4, **FALCON)
    ma, mb = fp.masks_of(a.model), fp.masks_of(b.model)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    check_refusal(cnn, DataError, "class indices per sample", data=(x, torch.stack([y, y], 1)),
                  flops=0.4, **FALCON)


def test_a_plain_list_of_samples_is_data(cnn, data):
    x, y = data
    samples = [(x[i], int(y[i])) for i in range(len(x))]
    r = fp.prune(cnn, samples, flops=0.4, **FALCON)
    assert r.flops_fraction <= 0.4 and r.config.sampling == "random"


def test_data_of_the_wrong_form_shape_or_values(cnn, data):
    x, y = data
    check_refusal(cnn, DataTypeError, "data must be", data=42, flops=0.5, progress=False)
    check_refusal(cnn, DataError, "could not run on the data", data=(x.flatten(1), y),
                  flops=0.5, **FALCON)
    nan_x = x.clone()
    nan_x[3] = float("inf")
    check_refusal(cnn, DataError, "NaN or inf", data=(nan_x, y), flops=0.5, sampling="first",
                  **FALCON)
    check_refusal(cnn, DataError, "first \\(batch\\) dimension", data=(x, y[:-1]), flops=0.5,
                  **FALCON)
    check_refusal(cnn, DataError, "asked for 241 samples", data=(x, y), flops=0.5,
                  n_gradients=241, progress=False)


# -- models --------------------------------------------------------------------------------
def test_models_that_cannot_be_pruned(data):
    check_refusal(nn.Sequential(nn.Flatten(), nn.ReLU()), ModelError, "no prunable layers",
                  data=data, flops=0.5, progress=False)
    with pytest.raises(ModelTypeError, match="torch.nn.Module"):
        fp.prune("resnet20", data, flops=0.5, progress=False)
    with torch.device("meta"):
        meta = SmallCNN()
    with pytest.raises(ModelError, match="meta device.*load its weights"):
        fp.prune(meta, data, flops=0.5, progress=False)


# -- budgets and settings ------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.float64(0.4), np.float32(0.4), np.int64(1)])
def test_numpy_scalar_budgets_are_accepted(cnn, data, value):
    r = fp.prune(cnn, data, flops=value, nnz=value, method="mp", progress=False)
    assert r.flops_budget == pytest.approx(float(value))
    assert r.flops_fraction <= float(value) + 1e-7


@pytest.mark.parametrize(("kw", "exc", "match"), [
    ({"flops": 0.0}, BudgetError, "not a fraction in"),
    ({"flops": 1.5}, BudgetError, "not a fraction in"),
    ({"flops": float("nan")}, BudgetError, "not a fraction in"),
    ({"flops": "0.3"}, ConfigTypeError, "must be a number"),
    ({"nnz": True}, ConfigTypeError, "must be a number"),
    ({}, BudgetError, "at least one budget"),
    ({"flops": 1e-4}, BudgetError, "allow_empty_layers"),
    ({"flops": 0.3, "method": "magic"}, fp.errors.ConfigError, "unknown method"),
    ({"flops": 0.3, "n_gradients": 0}, fp.errors.ConfigError, "integer >= 1"),
    ({"flops": 0.3, "memory_limit": 10_000}, fp.MemoryBudgetError, "memory limit"),
    ({"flops": 0.3, "alpha": -1.0}, fp.errors.ConfigError, "alpha"),
    ({"flops": 0.3, "ridge": 0.0}, fp.errors.ConfigError, "ridge"),
    ({"flops": 0.3, "block_size": 0}, fp.errors.ConfigError, "block_size"),
    ({"flops": 0.3, "dtype": torch.int32}, fp.errors.ConfigError, "dtype must be one of"),
    ({"flops": 0.3, "storage": "cloud"}, fp.errors.ConfigError, "storage must be one of"),
    ({"flops": 0.3, "device": "tpu9"}, fp.errors.ConfigError, "not a torch device"),
    ({"flops": 0.3, "solver": {"max_iter": 3}}, ConfigTypeError, "SolverOptions"),
    ({"flops": 0.3, "min_density": 1.0}, fp.errors.ConfigError, "min_density"),
    ({"flops": 0.3, "sampling": "best"}, fp.errors.ConfigError, "sampling"),
    ({"flops": 0.3, "task": "translation"}, fp.errors.ConfigError, "unknown task"),
])
def test_bad_settings_are_refused_and_the_model_unchanged(cnn, data, kw, exc, match):
    args = {"data": data, "method": "falcon", "n_gradients": 50, "progress": False, **kw}
    if args["method"] != "falcon":
        args.pop("n_gradients")
    check_refusal(cnn, exc, match, **args)


def test_an_unwritable_scratch_directory(cnn, data, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    check_refusal(cnn, PathError, "not a directory", data=data, flops=0.3, storage="disk",
                  scratch_dir=not_a_dir, **FALCON)
    if Path("/proc").is_dir():  # a directory no one can create files in, root included
        check_refusal(cnn, PathError, "not writable", data=data, flops=0.3, storage="disk",
                      scratch_dir="/proc", **FALCON)


def test_the_callers_rng_and_the_samples_of_recalibration(bn_cnn, data):
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = fp.prune(bn_cnn, data, flops=0.4, **FALCON)
    b = fp.prune(bn_cnn, data, flops=0.4, recalibrate_bn=200, **FALCON)
    assert torch.equal(torch.get_rng_state(), before)
    ma, mb = fp.masks_of(a.model), fp.masks_of(b.model)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


# -- the command line ----------------------------------------------------------------------
@pytest.fixture
def files(tmp_path):
    """A random MLPNet checkpoint and a small MNIST-like .npz (no ../shared needed)."""
    torch.manual_seed(0)
    ckpt = tmp_path / "mlp.pt"
    torch.save({"state_dict": MLPNet().state_dict()}, ckpt)
    g = np.random.default_rng(0)
    npz = tmp_path / "digits.npz"
    np.savez(npz, train_images=g.integers(0, 255, (300, 28, 28), dtype=np.uint8),
             train_labels=g.integers(0, 10, 300), test_images=g.integers(0, 255, (50, 28, 28),
                                                                         dtype=np.uint8),
             test_labels=g.integers(0, 10, 50))
    return ckpt, npz


def prune_args(ckpt, npz, out, *extra):
    return ["prune", "--model", "mlpnet", "--checkpoint", str(ckpt), "--dataset", "mnist",
            "--data", str(npz), "--flops", "0.3", "--n-gradients", "50", "--n-validation",
            "50", "--output", str(out), "--no-progress", *extra]


def one_line_error(capsys, match):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("falcon-prune: error:"), err
    assert match in err, err
    return err


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_cli_damaged_checkpoints(files, tmp_path, capsys, damage):
    ckpt, npz = files
    raw = ckpt.read_bytes()
    ckpt.write_bytes({"empty": b"", "truncated": raw[: len(raw) // 2],
                      "garbage": b"\x00not a torch file"}[damage])
    assert cli.main(prune_args(ckpt, npz, tmp_path / "o.pt")) == 2
    one_line_error(capsys, "empty" if damage == "empty" else "corrupt")
    assert cli.main(["evaluate", "--model", "mlpnet", "--checkpoint", str(ckpt), "--dataset",
                     "mnist", "--data", str(npz)]) == 2
    one_line_error(capsys, "checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(MLPNet(), ckpt)


def test_cli_checks_every_path_before_the_work(files, tmp_path, capsys, monkeypatch):
    ckpt, npz = files
    called = []
    monkeypatch.setattr("falcon_prune.api.prune", lambda *a, **k: called.append(1))
    assert cli.main(prune_args(ckpt, npz, tmp_path)) == 2  # the output is a directory
    one_line_error(capsys, "is a directory")
    assert cli.main(prune_args(ckpt, npz, tmp_path / "o.pt", "--report", "/proc/r.json")) == 2
    one_line_error(capsys, "cannot be written")
    assert cli.main(prune_args(ckpt, npz, tmp_path / "o.pt", "--storage", "disk",
                               "--scratch-dir", str(tmp_path / "none"))) == 2
    one_line_error(capsys, "not a directory")
    assert cli.main(prune_args(ckpt, tmp_path / "missing.npz", tmp_path / "o.pt")) == 2
    one_line_error(capsys, "no MNIST file")
    assert cli.main(prune_args(tmp_path / "missing.pt", npz, tmp_path / "o.pt")) == 2
    one_line_error(capsys, "does not exist")
    assert called == []  # none of them reached the pruning


def test_cli_gradual_resume_of_a_damaged_checkpoint(files, tmp_path, capsys):
    ckpt, npz = files
    run = tmp_path / "run"
    run.mkdir()
    (run / "gradual.pt").write_bytes(b"broken")
    args = ["gradual", "--model", "mlpnet", "--checkpoint", str(ckpt), "--dataset", "mnist",
            "--data", str(npz), "--flops", "0.3", "--method", "mp", "--checkpoint-dir",
            str(run), "--resume", "--output", str(tmp_path / "g.pt"), "--no-progress"]
    assert cli.main(args) == 2
    one_line_error(capsys, "corrupt")


def test_cli_keeps_the_traceback_of_an_internal_error(files, tmp_path, monkeypatch):
    ckpt, npz = files

    def broken(*args, **kw):
        raise RuntimeError("a bug")

    monkeypatch.setattr("falcon_prune.api.prune", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(prune_args(ckpt, npz, tmp_path / "o.pt"))


def test_data_files_that_are_missing_or_damaged(tmp_path):
    from falcon_prune.data.datasets import load_cifar10, load_mnist

    with pytest.raises(MissingFileError, match="no MNIST file"):
        load_mnist(tmp_path / "none.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_cifar10(bad)


def test_more_lower_level_refusals(tmp_path, bn_cnn, data):
    with pytest.raises(fp.errors.ConfigError, match="kept fractions"):
        fp.Schedule(levels=(0.8, "x"))
    with pytest.raises(fp.errors.ConfigError, match="kept fractions"):
        fp.Schedule(levels=(0.8, None))
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(b"not gzip at all")
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"nor this")
    from falcon_prune.data.datasets import load_mnist

    with pytest.raises(DataError, match="truncated or not gzip"):
        load_mnist(tmp_path)
    for bad in (0, -1):
        with pytest.raises(fp.errors.ConfigError, match="batch_size"):
            fp.recalibrate_batchnorm(fp.clone_model(bn_cnn), data[0], batch_size=bad)
    from falcon_prune.reports import plot_trajectory

    with pytest.raises(DataError, match="no rows"):
        plot_trajectory([], tmp_path / "p.png")
