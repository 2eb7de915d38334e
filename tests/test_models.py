import pytest
import torch
from conftest import shared_path

from falcon_prune.data import load_cifar10, load_mnist
from falcon_prune.evaluation import accuracy
from falcon_prune.models import (
    MLPNet,
    create_model,
    load_checkpoint,
    mobilenet_v1,
    resnet20,
    resnet50,
)


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
    with pytest.raises(ValueError, match="missing keys"):
        load_checkpoint(resnet20(), path)
    wrong = MLPNet((784, 30, 20, 10)).state_dict()
    torch.save(wrong, path)
    with pytest.raises(ValueError, match="wrong shape"):
        load_checkpoint(MLPNet(), path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(MLPNet(), tmp_path / "absent.pt")


def test_zoo_shapes_and_torchvision_keys():
    assert create_model("mlpnet")(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert mobilenet_v1()(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
    keys = set(resnet50().state_dict())
    assert {"conv1.weight", "layer1.0.downsample.0.weight", "layer4.2.bn3.running_mean",
            "fc.weight"} <= keys
    assert sum(v.numel() for k, v in resnet50().state_dict().items()
               if k.endswith("weight") and v.dim() > 1) == pytest.approx(25.5e6, rel=0.01)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vgg")
