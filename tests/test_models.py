import pytest
import torch
from conftest import shared_path

from falcon_prune.data.datasets import load_cifar10, load_mnist
from falcon_prune.data.evaluation import accuracy
from falcon_prune.errors import CheckpointError, ConfigError, MissingFileError
from falcon_prune.models import (
    CifarResNet,
    MLPNet,
    create_model,
    load_checkpoint,
    mobilenet_v1,
    resnet20,
    resnet50,
)


@pytest.mark.slow
def test_resnet20_checkpoint_reproduces_reference_accuracy():
    model = load_checkpoint(resnet20(), shared_path("checkpoints", "resnet20_cifar10.pth.tar"))
    test = load_cifar10(shared_path("data", "cifar10_subset.npz"), "test")
    assert len(test) == 846
    assert accuracy(model, test) == pytest.approx(0.9102, abs=0.002)


def test_mlpnet_checkpoint_loads_with_masks_folded():
    model = load_checkpoint(MLPNet(), shared_path("checkpoints", "mlpnet_mnist.ckpt"))
    data = load_mnist(shared_path("data", "mnist_10k.npz"), limit=2000)
    assert accuracy(model, data) > 0.9


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"state_dict": MLPNet().state_dict()}, path)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(resnet20(), path)
    wrong = MLPNet((784, 30, 20, 10)).state_dict()
    torch.save(wrong, path)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_checkpoint(MLPNet(), path)
    with pytest.raises(MissingFileError, match="does not exist"):
        load_checkpoint(MLPNet(), tmp_path / "absent.pt")


def test_checkpoint_layouts_load(tmp_path):
    source = MLPNet()
    path = tmp_path / "c.pt"
    # DataParallel's module. prefix under a 'model_state_dict' entry
    torch.save({"model_state_dict": {"module." + k: v for k, v in source.state_dict().items()},
                "epoch": 3}, path)
    model = load_checkpoint(MLPNet(), path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    # the reference MLPNet layout: fc1._layer.weight with a fc1._weight_mask to fold in
    state = {k.replace(".weight", "._layer.weight"): v for k, v in source.state_dict().items()}
    mask = torch.zeros_like(source.fc1.weight)
    mask[:, :100] = 1
    state["fc1._weight_mask"] = mask
    torch.save(state, path)
    model = load_checkpoint(MLPNet(), path)
    assert torch.equal(model.fc1.weight, source.fc1.weight * mask)
    assert torch.equal(model.fc2.weight, source.fc2.weight)


def test_corrupt_checkpoints_are_refused(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(MLPNet(), empty)
    path = tmp_path / "c.pt"
    torch.save(MLPNet().state_dict(), path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt, truncated or not a PyTorch checkpoint"):
        load_checkpoint(MLPNet(), truncated)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_checkpoint(MLPNet(), path)


def test_zoo_shapes_and_torchvision_keys():
    assert create_model("mlpnet")(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert create_model("resnet20")(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert mobilenet_v1()(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
    state = resnet50().state_dict()
    assert {"conv1.weight", "layer1.0.downsample.0.weight", "layer4.2.bn3.running_mean",
            "fc.weight"} <= set(state)
    assert sum(v.numel() for k, v in state.items()
               if k.endswith("weight") and v.dim() > 1) == pytest.approx(25.5e6, rel=0.01)
    with pytest.raises(ConfigError, match="unknown model"):
        create_model("vgg")
    with pytest.raises(ConfigError, match="6n\\+2"):
        CifarResNet(21)
