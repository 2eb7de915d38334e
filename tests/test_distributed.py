"""Distributed runs: two CPU processes with gloo, started by torchrun, against one process.

Each test saves a bundle (model, data, arguments), starts ``torchrun`` on
``distributed_worker.py`` and compares what every rank returned.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import small_data, trained_bn_cnn, trained_cnn

import falcon_prune as fp
from falcon_prune.analysis.costs import CostModel
from falcon_prune.data.batches import Samples
from falcon_prune.loss.distributed import Ranks

WORKER = Path(__file__).with_name("distributed_worker.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="this torch build has no torch.distributed")


def torchrun(tmp_path: Path, job: str, model, data, nproc: int = 2, expect_ok: bool = True,
             **kwargs) -> list[dict] | str:
    """Run ``job`` on ``nproc`` gloo ranks; returns each rank's record (the error output
    when the job is expected to fail)."""
    bundle, out = tmp_path / f"{job}.pt", tmp_path / f"{job}-out"
    out.mkdir(exist_ok=True)
    torch.save({"model": model, "data": data, "kwargs": kwargs}, bundle)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={nproc}", str(WORKER), job, str(bundle), str(out)],
        capture_output=True, text=True, timeout=300, env=env)
    if not expect_ok:
        assert proc.returncode != 0
        return proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def test_shares_of_rows_cover_everything_once():
    for world in (1, 2, 3, 5):
        spans = [Ranks(r, world).bounds(11) for r in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == 11
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


def test_each_rank_holds_its_rows_and_products_are_global(tmp_path):
    model = trained_cnn().double()
    x, y = small_data(40)
    x = x.double()
    cm = CostModel.from_model(model, x[:1])
    ref = fp.gradient_matrix(model, cm, Samples((x, y)), 21, dtype=torch.float64,
                             progress=False)
    ranks = torchrun(tmp_path, "rows", model, (x, y), n=21)
    assert [r["local_rows"] for r in ranks] == [11, 10]
    assert [r["start"] for r in ranks] == [0, 11]
    for r in ranks:
        assert torch.allclose(r["X"], ref, rtol=0, atol=1e-12)
        assert torch.allclose(r["gram"], ref @ ref.T, rtol=1e-12, atol=1e-12)
        assert torch.allclose(r["mv"], ref.sum(1), rtol=1e-12, atol=1e-12)
    # the storage plan is made per rank: on disk, in float16 (rows scaled per row)
    ranks = torchrun(tmp_path, "rows", model, (x, y), n=21, storage="disk",
                     dtype=torch.float16)
    for r in ranks:
        assert r["backend"] == "disk" and "rows split over 2 processes" in r["plan"]
        assert torch.allclose(r["X"], ref.float(), rtol=2e-3, atol=1e-3 * ref.abs().max())


def test_fewer_gradients_than_ranks_is_refused(tmp_path):
    model, (x, y) = trained_cnn(), small_data(40)
    err = torchrun(tmp_path, "prune", model, (x, y), expect_ok=False, flops=0.5,
                   method="woodfisher", n_gradients=1)
    assert "n_gradients=1 is fewer than the 2 processes" in err


@pytest.mark.parametrize("what, error", [("model", "ModelError"), ("data", "DataError")])
def test_ranks_with_different_models_or_data_are_refused(tmp_path, what, error):
    # without the check the ranks' integer programs choose different supports and the
    # next collective fails (or hangs) with a message about sizes, not the cause
    model, (x, y) = trained_cnn(), small_data(40)
    ranks = torchrun(tmp_path, "differ", model, (x, y), what=what, flops=0.5,
                     method="falcon", n_gradients=8, n_validation=4)
    assert [r["error"] for r in ranks] == [error, error]
    assert "differ between the torch.distributed ranks" in ranks[0]["message"]


@pytest.mark.parametrize("what, error, message", [
    ("nan", "DataError", "contain NaN or inf"),
    ("memory", "MemoryBudgetError", "cannot store its share")])
def test_a_failure_on_one_rank_stops_every_rank(tmp_path, what, error, message):
    # NaN in a sample of rank 1's rows only, or rank 1 alone without the memory for its
    # share: the other rank must raise too instead of waiting in the next collective
    model, (x, y) = trained_cnn(), small_data(40)
    x = x.clone()
    if what == "nan":
        x[15] = float("nan")  # rows 8..15 of 16 are rank 1's (sampling='first')
    ranks = torchrun(tmp_path, "differ", model, (x, y), what=what, flops=0.5,
                     method="falcon", n_gradients=16, n_validation=4, sampling="first",
                     storage="memory")
    assert [r["error"] for r in ranks] == [error, error]
    assert message in ranks[0]["message"] or message in ranks[1]["message"]
    assert "another process" in ranks[0]["message"]


@pytest.mark.parametrize("method, structure", [("falcon", "weights"), ("falcon++", "weights"),
                                               ("falcon", "channels")])
def test_two_ranks_give_the_single_process_result(tmp_path, method, structure):
    model = (trained_bn_cnn() if structure == "channels" else trained_cnn()).double()
    x, y = small_data(200)
    data = (x.double(), y)
    kw = dict(flops=0.5, method=method, structure=structure, n_gradients=60,
              n_validation=60, seed=1, sampling="random", dtype=torch.float64)
    if method == "falcon++":
        kw.update(stages=2, n_gradients=40)
    single = fp.prune(model, data, progress=False, **kw)
    ranks = torchrun(tmp_path, "prune", model, data, **kw)
    for r in ranks:
        assert r["flops"] <= 0.5 + 1e-9
        ref_state = single.model.state_dict()
        assert r["state"].keys() == ref_state.keys()
        for name, value in ref_state.items():
            if value.dtype == torch.bool or name.endswith("_mask"):
                assert torch.equal(r["state"][name], value), name
            else:
                assert r["state"][name].shape == value.shape, name
                assert torch.allclose(r["state"][name], value, rtol=1e-6, atol=1e-9), name
    assert "2 processes" in ranks[0]["details"]["distributed"]


def test_distributed_gradual_resumes_to_the_uninterrupted_result(tmp_path):
    model = trained_cnn()
    data = small_data(160)
    kw = dict(flops=0.4, method="falcon", n_gradients=30, n_validation=30, stages=2,
              epochs_per_stage=1, final_epochs=1, batch_size=32, seed=0)
    whole = torchrun(tmp_path, "gradual", model, data, **kw)
    assert len(whole[0]["history"]) == 5  # 2 x (prune + epoch) + final epoch
    for name, value in whole[0]["state"].items():  # data-parallel: the ranks agree
        assert torch.equal(whole[1]["state"][name], value), name
    ckpt = tmp_path / "ckpt"
    torchrun(tmp_path, "gradual", model, data, expect_ok=False, checkpoint_dir=str(ckpt),
             stop_after=3, **kw)
    assert (ckpt / "gradual.pt").is_file()
    resumed = torchrun(tmp_path, "gradual", model, data, checkpoint_dir=str(ckpt),
                       resume=True, **kw)
    assert [h["event"] for h in resumed[0]["history"]] == [1, 2, 3, 4, 5]
    for r in resumed:
        assert r["flops"] <= 0.4 + 1e-9
        for name, value in whole[0]["state"].items():
            assert torch.allclose(r["state"][name].float(), value.float(), atol=1e-6), name
    # a checkpoint_dir that one rank does not see (another machine's disk) stops every rank
    elsewhere = tmp_path / "other-machine"
    split = torchrun(tmp_path, "gradual", model, data, checkpoint_dir=str(ckpt), resume=True,
                     rank1={"checkpoint_dir": str(elsewhere)}, **kw)
    assert [r["error"] for r in split] == ["CheckpointError", "MissingFileError"]
    assert "another process could not resume" in split[0]["message"]


def test_cli_under_torchrun_writes_once_and_matches_one_process(tmp_path, capsys):
    from conftest import shared_path

    from falcon_prune.cli import main

    ckpt = shared_path("checkpoints", "mlpnet_mnist.ckpt")
    data = shared_path("data", "mnist_10k.npz")
    args = ["prune", "--model", "mlpnet", "--checkpoint", str(ckpt), "--dataset", "mnist",
            "--data", str(data), "--flops", "0.3", "--n-gradients", "100",
            "--n-validation", "100", "--dtype", "float64", "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "one.pt")]) == 0
    capsys.readouterr()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "falcon_prune", *args, "--output", str(tmp_path / "two.pt"), "--report",
         str(tmp_path / "two.json")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved ") == 1 and proc.stdout.count("wrote ") == 1
    one = torch.load(tmp_path / "one.pt", weights_only=False)
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    assert "2 processes" in two["report"]["details"]["distributed"]
    for name, mask in one["masks"].items():
        assert torch.equal(two["masks"][name], mask), name
    for name, value in one["state_dict"].items():
        assert torch.allclose(two["state_dict"][name], value, atol=1e-6), name


@pytest.mark.parametrize("side", ["0", "1"])
def test_bfloat16_rows_give_the_single_process_gram_on_both_hardware_sides(tmp_path, side,
                                                                           monkeypatch):
    """A float32 model's rows computed in bfloat16: their Gram over two ranks (each rank's
    rows against every other's, under oneDNN's bf16 precision where the hardware has it,
    forced either way) equals one process's to float32 rounding."""
    from falcon_prune.loss.storage import NATIVE_BFLOAT16_ENV

    monkeypatch.setenv(NATIVE_BFLOAT16_ENV, side)  # the ranks inherit the environment
    model = trained_cnn()
    x, y = small_data(40)
    cm = CostModel.from_model(model, x[:1])
    one = fp.gradient_store(model, cm, Samples((x, y)), 24, progress=False,
                            precision=torch.bfloat16)
    ranks = torchrun(tmp_path, "gram", model, (x, y), n=24)
    ref = one.gram()
    for r in ranks:
        assert torch.allclose(r["gram"], ref, rtol=1e-5, atol=1e-7 * float(ref.abs().max()))


def test_layerwise_masks_of_two_ranks_are_one_process_masks(tmp_path):
    """Layer-wise calibration under torchrun: the ranks split the sequences and sum their
    Grams; every rank ends with the one-process masks."""
    T = pytest.importorskip("transformers", reason="needs transformers ([hf] extra)")
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(2))
    kw = dict(task="language_modeling", method="falcon", loss_model="layerwise", nnz=0.5,
              n_calibration=16)
    single = fp.prune(model, ids, progress=False, **kw)
    ranks = torchrun(tmp_path, "prune", model, ids, **kw)
    ref = {lay.name: single.model.get_parameter(lay.name) != 0 for lay in single.layers}
    for r in ranks:
        assert all(torch.equal(r["state"][k] != 0, ref[k]) for k in ref)


def test_structured_gpt2_with_a_rank_that_saw_no_tokens_matches_one_process(tmp_path):
    """GPT-2's Conv1D layers (weights stored (in, out)) under torchrun, with one sequence
    for two ranks: the rank that saw no tokens still sums Grams of the right width, and
    both ranks end with the one-process smaller model."""
    T = pytest.importorskip("transformers", reason="needs transformers ([hf] extra)")
    cfg = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                       bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    kw = dict(task="language_modeling", structure="channels", loss_model="layerwise",
              flops=0.7, n_calibration=1)
    single = fp.prune(model, ids, progress=False, **kw).model.state_dict()
    for r in torchrun(tmp_path, "prune", model, ids, **kw):
        assert r["state"].keys() == single.keys()
        for k, v in single.items():
            assert r["state"][k].shape == v.shape, k
            assert torch.allclose(r["state"][k], v, atol=1e-5), k
