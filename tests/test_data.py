"""Data loaders on tiny fake files: IDX, pickle batches, npz; explicit splits; clear errors."""

import gzip
import pickle
import sys

import numpy as np
import pytest
import torch

from falcon_prune.data.datasets import (
    CIFAR_MEAN,
    CIFAR_STD,
    MNIST_MEAN,
    MNIST_STD,
    load_cifar10,
    load_dataset,
    load_imagenet,
    load_mnist,
)
from falcon_prune.errors import ConfigError, DataError, DependencyError, MissingFileError

WHITE_MNIST = (1.0 - MNIST_MEAN) / MNIST_STD  # a 255 pixel, normalised
BLACK_MNIST = (0.0 - MNIST_MEAN) / MNIST_STD


def fake_digits(n, first_label=0):
    """uint8 images (n, 28, 28), all black but pixel (3, 5) = 255, and labels (n,)."""
    x = np.zeros((n, 28, 28), dtype=np.uint8)
    x[:, 3, 5] = 255
    return x, (np.arange(n) + first_label) % 10


def write_idx(path, array, compress):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist_dir(root, compress, n_train=5, n_test=3):
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if compress else ""
    for prefix, n, first in (("train", n_train, 0), ("t10k", n_test, 7)):
        x, y = fake_digits(n, first)
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", x, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", y, compress)
    return root


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_files_gzipped_and_plain(tmp_path, compress):
    root = write_mnist_dir(tmp_path / "mnist", compress)
    train, test = load_mnist(root, "train"), load_mnist(root, "test")
    x, y = train.tensors
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x[0, 0, 3, 5].item() == pytest.approx(WHITE_MNIST)
    assert x[0, 0, 0, 0].item() == pytest.approx(BLACK_MNIST)
    assert y.tolist() == [0, 1, 2, 3, 4]
    assert test.tensors[1].tolist() == [7, 8, 9]
    both = load_mnist(root, "all")
    assert both.tensors[1].tolist() == [0, 1, 2, 3, 4, 7, 8, 9]
    assert len(load_mnist(root, "train", limit=2)) == 2


def test_mnist_idx_files_under_torchvision_layout(tmp_path):
    write_mnist_dir(tmp_path / "MNIST" / "raw", compress=True)
    assert len(load_dataset("mnist", tmp_path, "test")) == 3


def test_mnist_missing_files_and_directory(tmp_path):
    with pytest.raises(MissingFileError, match="neither an .npz file nor a directory"):
        load_mnist(tmp_path / "absent")
    with pytest.raises(MissingFileError, match="t10k-images-idx3-ubyte"):
        load_mnist(tmp_path, "test")
    with pytest.raises(MissingFileError, match="no MNIST file at"):
        load_mnist(tmp_path / "absent.npz")


def test_corrupt_idx_file_is_named(tmp_path):
    root = write_mnist_dir(tmp_path, compress=False)
    (root / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03")
    with pytest.raises(DataError, match="bad magic number"):
        load_mnist(root)
    x, _ = fake_digits(5)
    write_idx(root / "train-images-idx3-ubyte", x, compress=False)
    with open(root / "train-images-idx3-ubyte", "ab") as f:
        f.write(b"\x00")  # one byte more than the header says
    with pytest.raises(DataError, match="truncated or padded"):
        load_mnist(root)
    write_idx(root / "train-images-idx3-ubyte", x[:4], compress=False)
    with pytest.raises(DataError, match="4 images but .* 5 labels"):
        load_mnist(root)


def test_unreadable_npz_is_named(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="not a readable .npz file"):
        load_mnist(path)


def test_mnist_npz_with_splits(tmp_path):
    (xa, ya), (xb, yb) = fake_digits(4), fake_digits(2, first_label=5)
    path = tmp_path / "mnist.npz"  # keras' layout
    np.savez(path, x_train=xa, y_train=ya, x_test=xb, y_test=yb)
    assert load_mnist(path, "train").tensors[1].tolist() == [0, 1, 2, 3]
    assert load_mnist(path, "test").tensors[1].tolist() == [5, 6]
    assert len(load_mnist(path, "all")) == 6
    named = tmp_path / "named.npz"
    np.savez(named, train_images=xa, train_labels=ya, test_images=xb, test_labels=yb)
    x, y = load_mnist(named, "test").tensors
    assert x.shape == (2, 1, 28, 28) and y.tolist() == [5, 6]


def test_unsplit_npz_has_no_test_split(tmp_path):
    x, y = fake_digits(6)
    path = tmp_path / "mnist_10k.npz"
    np.savez(path, images=x, labels=y)
    assert load_mnist(path, "train").tensors[1].tolist() == y.tolist()
    assert len(load_mnist(path, "all")) == 6
    with pytest.raises(DataError, match="no test split.*split='all'"):
        load_mnist(path, "test")
    with pytest.raises(DataError, match="no test split"):
        load_dataset("mnist", path, "test")


def test_bad_split_and_missing_arrays(tmp_path):
    x, y = fake_digits(2)
    path = tmp_path / "only_train.npz"
    np.savez(path, x_train=x, y_train=y)
    with pytest.raises(ConfigError, match="split must be 'train', 'test' or 'all'"):
        load_mnist(path, "val")
    with pytest.raises(ConfigError, match="split must be"):
        load_cifar10(path, "validation")
    with pytest.raises(DataError, match=r"no MNIST test arrays.*\['x_train', 'y_train'\]"):
        load_mnist(path, "test")
    np.savez(path, x_train=x, y_train=y[:1])
    with pytest.raises(DataError, match="2 images but 1 labels"):
        load_mnist(path)


def fake_cifar(n, first_label=0):
    """uint8 CHW images (n, 3, 32, 32): channel 0 is 255, channel 1 is 51, channel 2 is 0."""
    x = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    x[:, 0], x[:, 1] = 255, 51
    return x, [(i + first_label) % 10 for i in range(n)]


def write_cifar_dir(root):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        x, labels = fake_cifar(2, first_label=2 * i)
        with open(base / name, "wb") as f:
            pickle.dump({b"data": x.reshape(2, -1), b"labels": labels}, f)
    return root


def check_cifar_pixels(x):
    assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
    expected = [(v / 255 - CIFAR_MEAN) / CIFAR_STD for v in (255, 51, 0)]
    assert x[0, :, 7, 9].tolist() == pytest.approx(expected)
    assert expected == pytest.approx([1.0, -0.6, -1.0])


def test_cifar_pickle_batches(tmp_path):
    root = write_cifar_dir(tmp_path)
    train, test = load_cifar10(root, "train"), load_cifar10(root, "test")
    x, y = train.tensors
    assert x.shape == (10, 3, 32, 32) and y.dtype == torch.int64
    assert y.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    check_cifar_pixels(x)
    assert test.tensors[1].tolist() == [0, 1]
    assert len(load_dataset("cifar10", root / "cifar-10-batches-py", "all")) == 12


def test_cifar_missing_batches(tmp_path):
    root = write_cifar_dir(tmp_path)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(MissingFileError, match="missing data_batch_3"):
        load_cifar10(root, "train")
    assert len(load_cifar10(root, "test")) == 2
    with pytest.raises(MissingFileError, match="neither an .npz file nor a directory"):
        load_cifar10(tmp_path / "absent")


def test_corrupt_cifar_batch_is_named(tmp_path):
    root = write_cifar_dir(tmp_path)
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="test_batch is not a readable CIFAR-10 batch"):
        load_cifar10(root, "test")
    assert len(load_cifar10(root, "train")) == 10


def test_cifar_npz_chw_and_keras_nhwc(tmp_path):
    x, y = fake_cifar(3)
    path = tmp_path / "subset.npz"
    np.savez(path, train_images=x, train_labels=y, test_images=x[:1], test_labels=y[:1])
    check_cifar_pixels(load_cifar10(path, "train").tensors[0])
    assert load_cifar10(path, "test").tensors[1].tolist() == [0]
    keras = tmp_path / "keras.npz"  # NHWC images, labels of shape (N, 1)
    np.savez(keras, x_train=x.transpose(0, 2, 3, 1), y_train=np.array(y)[:, None],
             x_test=x[:2].transpose(0, 2, 3, 1), y_test=np.array(y[:2])[:, None])
    xt, yt = load_cifar10(keras, "train").tensors
    check_cifar_pixels(xt)
    assert yt.shape == (3,) and yt.tolist() == [0, 1, 2]
    assert len(load_cifar10(keras, "all")) == 5


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(ConfigError, match="choose mnist, cifar10 or imagenet"):
        load_dataset("svhn", tmp_path)


def test_imagenet_without_torchvision_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` now fails
    with pytest.raises(DependencyError, match=r"needs torchvision.*pip install torchvision"):
        load_imagenet(tmp_path)
    with pytest.raises(DependencyError, match="torchvision"):
        load_dataset("imagenet", tmp_path, "test")


def test_imagenet_image_folder(tmp_path):
    pytest.importorskip("torchvision", reason="ImageFolder loading needs torchvision")
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        Image.new("RGB", (300, 260), (255, 0, 0)).save(tmp_path / "val" / cls / "0.png")
    ds = load_dataset("imagenet", tmp_path, "test")
    x, label = ds[1]
    assert x.shape == (3, 224, 224) and label == 1
    assert x[0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, abs=1e-4)
    with pytest.raises(MissingFileError, match="no ImageFolder directory"):
        load_imagenet(tmp_path, "train")
