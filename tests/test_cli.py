import torch
from conftest import shared_path

from falcon_prune.cli import main


def test_demo_runs_and_falcon_beats_magnitude(capsys):
    assert main(["demo", "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
            if line.split() and line.split()[0] in ("mp", "mp_flops", "falcon")}
    assert set(rows) == {"mp", "mp_flops", "falcon"}
    assert rows["falcon"] > max(rows["mp"], rows["mp_flops"])


def test_prune_and_evaluate_mlpnet(tmp_path, capsys):
    ckpt = shared_path("checkpoints", "mlpnet_mnist.ckpt")
    data = shared_path("data", "mnist_10k.npz")
    out = tmp_path / "pruned.pt"
    args = ["prune", "--model", "mlpnet", "--checkpoint", str(ckpt), "--dataset", "mnist",
            "--data", str(data), "--flops", "0.2", "--n-gradients", "200",
            "--n-validation", "200", "--output", str(out), "--report",
            str(tmp_path / "r.json"), "--no-progress"]
    assert main(args) == 0
    saved = torch.load(out, weights_only=False)
    assert saved["report"]["flops_fraction"] <= 0.2
    capsys.readouterr()
    assert main(["evaluate", "--model", "mlpnet", "--checkpoint", str(out), "--dataset",
                 "mnist", "--data", str(data)]) == 0
    text = capsys.readouterr().out
    assert "FLOPs kept 0.2000" in text or "FLOPs kept 0.19" in text
    acc = float(text.split("accuracy ")[1].split()[0])
    assert acc > 0.8


def test_cli_errors_are_reported(tmp_path, capsys):
    ckpt = shared_path("checkpoints", "mlpnet_mnist.ckpt")
    data = shared_path("data", "mnist_10k.npz")
    base = ["prune", "--model", "mlpnet", "--checkpoint", str(ckpt), "--dataset", "mnist",
            "--data", str(data), "--output", str(tmp_path / "o.pt"), "--no-progress"]
    assert main([*base, "--flops", "1.5"]) == 2
    assert "not a fraction" in capsys.readouterr().err
    assert main(["evaluate", "--model", "resnet20", "--checkpoint", str(ckpt), "--dataset",
                 "mnist", "--data", str(data)]) == 2
    assert "does not match" in capsys.readouterr().err
