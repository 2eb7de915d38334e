"""Data sets of the paper's settings, as plain tensors or loaders; torchvision is optional.

Every loader returns a :class:`torch.utils.data.TensorDataset` of (normalised float images,
int64 labels). Normalisations are those the shared checkpoints were trained with:
MNIST ``(x/255 - 0.1307) / 0.3081``; CIFAR-10 ``(x/255 - 0.5) / 0.5`` per channel.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN, CIFAR_STD = 0.5, 0.5


def normalize_mnist(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), normalised."""
    x = torch.as_tensor(np.asarray(images)).float().div(255.0)
    if x.dim() == 3:
        x = x[:, None]
    return (x - MNIST_MEAN) / MNIST_STD


def normalize_cifar(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) (or NHWC) -> float32 (N, 3, 32, 32), normalised to [-1, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.dim() == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    x = x.float().div(255.0)
    return (x - CIFAR_MEAN) / CIFAR_STD


def _dataset(x: torch.Tensor, y: np.ndarray | torch.Tensor) -> TensorDataset:
    return TensorDataset(x.contiguous(), torch.as_tensor(np.asarray(y)).long())


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(root: Path, names: list[str]) -> Path | None:
    for name in names:
        for cand in (root / name, root / "MNIST" / "raw" / name, root / "raw" / name):
            if cand.exists():
                return cand
    return None


def load_mnist(
    root: str | Path, split: str = "train", download: bool = False, limit: int | None = None
) -> TensorDataset:
    """MNIST from ``root``: an ``.npz`` with ``images``/``labels`` (the shared file, or
    ``x_train``/``y_train``), the standard IDX files (optionally gzipped), or, with
    ``download=True`` and torchvision installed, torchvision's download."""
    root = Path(root)
    if root.suffix == ".npz":
        with np.load(root) as z:
            keys = ("images", "labels") if "images" in z else (f"x_{split}", f"y_{split}")
            x, y = z[keys[0]], z[keys[1]]
    else:
        prefix = "train" if split == "train" else "t10k"
        img = _find(root, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images-idx3-ubyte.gz"])
        lab = _find(root, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels-idx1-ubyte.gz"])
        if img is None or lab is None:
            if not download:
                raise FileNotFoundError(
                    f"no MNIST {split} files under {root}: expected {prefix}-images-idx3-ubyte[.gz]"
                    " and its labels, or pass an .npz file, or download=True (needs torchvision)"
                )
            tv = _torchvision()
            ds = tv.datasets.MNIST(str(root), train=split == "train", download=True)
            x, y = ds.data.numpy(), ds.targets.numpy()
        else:
            x, y = _read_idx(img), _read_idx(lab)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return _dataset(normalize_mnist(x), y)


def load_cifar10(
    root: str | Path, split: str = "train", download: bool = False, limit: int | None = None
) -> TensorDataset:
    """CIFAR-10 from ``root``: an ``.npz`` (the shared ``cifar10_subset.npz`` with
    ``{train,test}_images``/``_labels``), the standard python pickle batches
    (``cifar-10-batches-py``), or torchvision's download with ``download=True``."""
    root = Path(root)
    if root.suffix == ".npz":
        with np.load(root) as z:
            x, y = z[f"{split}_images"], z[f"{split}_labels"]
    else:
        base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").exists() else root
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        files = [base / n for n in names]
        if all(f.exists() for f in files):
            xs, ys = [], []
            for f in files:
                with open(f, "rb") as fh:
                    d = pickle.load(fh, encoding="bytes")
                xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d[b"labels"]))
            x, y = np.concatenate(xs), np.concatenate(ys)
        elif download:
            tv = _torchvision()
            ds = tv.datasets.CIFAR10(str(root), train=split == "train", download=True)
            x, y = ds.data, np.asarray(ds.targets)
        else:
            raise FileNotFoundError(
                f"no CIFAR-10 {split} batches under {root}: expected cifar-10-batches-py/"
                f"{names[0]}, or pass an .npz file, or download=True (needs torchvision)"
            )
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return _dataset(normalize_cifar(x), y)


def load_imagenet(root: str | Path, split: str = "val") -> Dataset:
    """ImageNet from an ImageFolder directory ``root/split/<class>/<image>`` with the usual
    resize-256 / centre-crop-224 / mean-std normalisation (needs torchvision)."""
    tv = _torchvision()
    path = Path(root) / split
    if not path.is_dir():
        raise FileNotFoundError(f"no ImageFolder directory at {path}")
    t = tv.transforms
    transform = t.Compose(
        [
            t.Resize(256),
            t.CenterCrop(224),
            t.ToTensor(),
            t.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    return tv.datasets.ImageFolder(str(path), transform=transform)


def _torchvision():
    try:
        import torchvision
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this needs torchvision, which falcon-prune does not require; install it "
            "(pip install torchvision) or pass local files"
        ) from e
    return torchvision


DATASETS = {"mnist": load_mnist, "cifar10": load_cifar10}


def load_dataset(name: str, root: str | Path, split: str = "train", **kw) -> Dataset:
    """Dispatch by name: 'mnist', 'cifar10' or 'imagenet'."""
    if name == "imagenet":
        return load_imagenet(root, "val" if split == "test" else split)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose mnist, cifar10 or imagenet")
    return DATASETS[name](root, split, **kw)
