import json

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
                 "mnist", "--data", str(data), "--split", "all"]) == 0
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
    # the shared MNIST file has training digits only: no silent "test" accuracy
    assert main(["evaluate", "--model", "mlpnet", "--checkpoint", str(ckpt), "--dataset",
                 "mnist", "--data", str(data)]) == 2
    assert "no test split" in capsys.readouterr().err
    # multi-stage options with a single-stage method are refused before any work
    assert main([*base, "--flops", "0.3", "--method", "falcon", "--stages", "3"]) == 2
    assert "only apply to --method falcon++" in capsys.readouterr().err
    assert main([*base, "--flops", "0.3", "--method", "mp", "--no-resample"]) == 2
    assert "--no-resample only apply" in capsys.readouterr().err
    assert main([*base, "--flops", "0.3", "--method", "falcon", "--min-step", "0.1"]) == 2
    assert "--min-step only apply" in capsys.readouterr().err
    assert main([*base, "--flops", "0.3", "--method", "falcon", "--effort", "fast"]) == 2
    assert "--effort only apply" in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()


def test_prune_with_gradients_on_disk_in_float16(tmp_path, capsys):
    ckpt = shared_path("checkpoints", "mlpnet_mnist.ckpt")
    data = shared_path("data", "mnist_10k.npz")
    report = tmp_path / "r.json"
    assert main(["prune", "--model", "mlpnet", "--checkpoint", str(ckpt), "--dataset", "mnist",
                 "--data", str(data), "--flops", "0.3", "--n-gradients", "100",
                 "--n-validation", "100", "--storage", "disk", "--dtype", "float16",
                 "--scratch-dir", str(tmp_path), "--output", str(tmp_path / "o.pt"),
                 "--gradient-precision", "bfloat16", "--held-out-precision", "bfloat16",
                 "--report", str(report), "--no-progress"]) == 0
    out = json.loads(report.read_text())
    details = out["details"]
    assert details["storage"].startswith("gradient matrix on disk") and "float16" in \
        details["storage"]
    assert out["config"]["gradient_precision"] == "bfloat16"
    assert out["config"]["held_out_precision"] == "bfloat16"


def test_falcon_plus_plus_and_gradual_from_the_command_line(tmp_path, capsys):
    ckpt = shared_path("checkpoints", "mlpnet_mnist.ckpt")
    data = shared_path("data", "mnist_10k.npz")
    common = ["--model", "mlpnet", "--checkpoint", str(ckpt), "--dataset", "mnist",
              "--data", str(data), "--flops", "0.3", "--n-gradients", "100",
              "--n-validation", "100", "--stages", "2", "--no-progress"]
    out = tmp_path / "fpp.pt"
    assert main(["prune", *common, "--method", "falcon++", "--output", str(out),
                 "--trajectory", str(tmp_path / "t.csv"), "--plot", str(tmp_path / "t.png"),
                 "--summary", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.csv").read_text().count("\n") == 3
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert "| stage |" in (tmp_path / "t.md").read_text()
    assert torch.load(out, weights_only=False)["report"]["flops_fraction"] <= 0.3
    assert main(["prune", *common, "--method", "falcon++", "--no-resample", "--output",
                 str(tmp_path / "fpp2.pt")]) == 0
    # 4 linear stages to 30 %: steps of 17.5 %; --min-step 0.2 merges every other one
    merged = [*common[:-3], "--stages", "4", "--schedule", "linear", "--min-step", "0.2",
              "--no-progress"]
    assert main(["prune", *merged, "--method", "falcon++", "--output", str(tmp_path / "m.pt"),
                 "--trajectory", str(tmp_path / "m.json")]) == 0
    levels = [row["flops_budget"] for row in json.loads((tmp_path / "m.json").read_text())]
    assert levels == [0.65, 0.3]
    g = ["gradual", *common, "--method", "falcon", "--epochs-per-stage", "1", "--final-epochs",
         "1", "--batch-size", "500", "--checkpoint-dir", str(tmp_path / "ck"), "--output",
         str(tmp_path / "g.pt"), "--history", str(tmp_path / "h.json"), "--plot",
         str(tmp_path / "h.png"), "--summary", str(tmp_path / "h.md"), "--eval-split", "none"]
    assert main(g) == 0
    assert "gradual falcon: FLOPs kept" in capsys.readouterr().out
    assert (tmp_path / "h.png").exists() and "| event |" in (tmp_path / "h.md").read_text()
    # the finished run's checkpoint is not overwritten by accident
    assert main(g) == 2
    assert "resume" in capsys.readouterr().err
    # resuming a finished run re-does nothing and reports the same result
    assert main([*g, "--resume"]) == 0


def test_prune_resnet20_with_batchnorm_recalibration(tmp_path, capsys):
    ckpt = shared_path("checkpoints", "resnet20_cifar10.pth.tar")
    data = shared_path("data", "cifar10_subset.npz")
    base = ["prune", "--model", "resnet20", "--checkpoint", str(ckpt), "--dataset", "cifar10",
            "--data", str(data), "--flops", "0.4", "--method", "mp", "--no-progress"]
    report = tmp_path / "r.json"
    assert main([*base, "--recalibrate-bn", "300", "--output", str(tmp_path / "o.pt"),
                 "--report", str(report)]) == 0
    details = json.loads(report.read_text())["details"]
    assert details["batchnorm"] == "running statistics re-estimated on 300 samples after pruning"
    capsys.readouterr()
    assert main([*base, "--recalibrate-bn", "-1", "--output", str(tmp_path / "bad.pt")]) == 2
    assert "recalibrate_bn must be" in capsys.readouterr().err
    assert not (tmp_path / "bad.pt").exists()
