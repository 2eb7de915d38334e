"""Data sets of the paper's settings, as plain tensors or loaders; torchvision is optional.

Every loader returns a :class:`torch.utils.data.TensorDataset` of (normalised float images,
int64 labels). ``split`` is explicit: 'train', 'test' or 'all'; a file without the split
asked for raises instead of returning other images. Normalisations are those the shared
checkpoints were trained with: MNIST ``(x/255 - 0.1307) / 0.3081``; CIFAR-10
``(x/255 - 0.5) / 0.5`` per channel.
"""

from __future__ import annotations

import gzip
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from falcon_prune.errors import ConfigError, DataError, DependencyError, MissingFileError

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
    """(images, int64 labels (N,)); labels of shape (N, 1), as in keras' CIFAR-10, are
    flattened."""
    y = np.asarray(y).reshape(-1)
    if len(y) != len(x):
        raise DataError(f"the data has {len(x)} images but {len(y)} labels; check the file")
    return TensorDataset(x.contiguous(), torch.as_tensor(y).long())


SPLITS = ("train", "test", "all")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split must be 'train', 'test' or 'all' (both), got {split!r}")


def _parts(split: str) -> tuple[str, ...]:
    """The file splits that make up ``split``: 'all' is train followed by test."""
    return ("train", "test") if split == "all" else (split,)


def _concat(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if len(pairs) == 1:
        return pairs[0]
    return np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs])


def _npz_split(z, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``{split}_images``/``{split}_labels`` or keras' ``x_{split}``/``y_{split}``, if present."""
    for xk, yk in ((f"{split}_images", f"{split}_labels"), (f"x_{split}", f"y_{split}")):
        if xk in z and yk in z:
            return z[xk], z[yk]
    return None


def load_npz(path: Path, split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of ``split`` from an ``.npz``: split-specific arrays
    (``train_images``/``train_labels``, ``test_...``, or ``x_train``/``y_train``, ``x_test``
    ...) or one unsplit ``images``/``labels`` pair, which is taken as training data (as in
    the shared ``mnist_10k.npz``, made of MNIST training digits) and has no test split.
    ``split='all'`` is every sample of the file (train then test)."""
    _check_split(split)
    if not path.is_file():
        raise MissingFileError(f"no {name} file at {path}; check the path (--data)")
    try:
        z = np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz file ({e}); check the file") from e
    with z:
        splits = {s: got for s in ("train", "test") if (got := _npz_split(z, s)) is not None}
        if splits and split == "all":
            return _concat(list(splits.values()))
        if split in splits:
            return splits[split]
        if not splits and "images" in z and "labels" in z:
            if split == "test":
                raise DataError(
                    f"{path} holds one unsplit images/labels array (training data) and no test "
                    "split; load it with split='all' (or 'train') knowing it is training data "
                    "(command line: evaluate --split all, gradual --eval-split none), or pass "
                    "a file with a test split (test_images/test_labels or x_test/y_test)"
                )
            return z["images"], z["labels"]
        raise DataError(
            f"{path} has no {name} {split} arrays: expected {split}_images/{split}_labels, "
            f"x_{split}/y_{split} or an unsplit images/labels pair; it has {sorted(z.files)}"
        )


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (optionally gzipped) as a uint8 array of its shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        raise DataError(f"{path} cannot be read ({e}); it is truncated or not gzip") from e
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != 4 + 4 * ndim + int(np.prod(shape)):
        raise DataError(f"{path} is truncated or padded: its header says shape {shape}")
    # a writable copy: torch warns on (and must not write into) read-only buffers
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _find(root: Path, names: list[str]) -> Path | None:
    for name in names:
        for cand in (root / name, root / "MNIST" / "raw" / name, root / "raw" / name):
            if cand.exists():
                return cand
    return None


def _check_dir(root: Path, name: str) -> None:
    if not root.is_dir():
        raise MissingFileError(
            f"{root} is neither an .npz file nor a directory; give the {name} data directory "
            "or .npz file (--data)"
        )


def _mnist_files(root: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 28, 28) and labels (N,) of 'train' or 'test' from IDX files."""
    prefix = "train" if split == "train" else "t10k"
    img = _find(root, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images-idx3-ubyte.gz"])
    lab = _find(root, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels-idx1-ubyte.gz"])
    if img is not None and lab is not None:
        x, y = _read_idx(img), _read_idx(lab)
        if len(x) != len(y):
            raise DataError(f"{img} has {len(x)} images but {lab} has {len(y)} labels")
        return x, y
    if not download:
        raise MissingFileError(
            f"no MNIST {split} files under {root}: expected {prefix}-images-idx3-ubyte[.gz] and "
            f"{prefix}-labels-idx1-ubyte[.gz], or pass an .npz file, or download=True (needs "
            "torchvision)"
        )
    ds = _torchvision().datasets.MNIST(str(root), train=split == "train", download=True)
    return ds.data.numpy(), ds.targets.numpy()


def load_mnist(
    root: str | Path, split: str = "train", download: bool = False, limit: int | None = None
) -> TensorDataset:
    """MNIST images (N, 1, 28, 28) float32, normalised, and int64 labels (N,).

    ``root`` is an ``.npz`` (see :func:`load_npz`: ``x_train``/``x_test`` as in keras'
    ``mnist.npz``, ``train_images``/``test_images``, or the shared unsplit ``images``, which
    has no test split), a directory with the standard IDX files (``train-images-idx3-ubyte``,
    ``t10k-...``, optionally gzipped, also under ``MNIST/raw`` or ``raw``), or, with
    ``download=True`` and torchvision installed, torchvision's download there. ``split`` is
    'train', 'test' or 'all' (train then test); ``limit`` keeps the first samples."""
    _check_split(split)
    root = Path(root)
    if root.suffix == ".npz":
        x, y = load_npz(root, split, "MNIST")
    else:
        if not download:
            _check_dir(root, "MNIST")
        x, y = _concat([_mnist_files(root, s, download) for s in _parts(split)])
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return _dataset(normalize_mnist(x), y)


def _cifar_batches(root: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 3, 32, 32) and labels (N,) of 'train' or 'test' from pickle batches."""
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").exists() else root
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    files = [base / n for n in names]
    if all(f.exists() for f in files):
        xs, ys = [], []
        for f in files:
            try:
                with open(f, "rb") as fh:
                    d = pickle.load(fh, encoding="bytes")
            except (pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
                raise DataError(f"{f} is not a readable CIFAR-10 batch ({e})") from e
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"]))
        return np.concatenate(xs), np.concatenate(ys)
    if not download:
        missing = [f.name for f in files if not f.exists()]
        raise MissingFileError(
            f"no CIFAR-10 {split} batches under {root}: missing {', '.join(missing)} (in "
            "cifar-10-batches-py/ or the directory itself); pass an .npz file, or "
            "download=True (needs torchvision)"
        )
    ds = _torchvision().datasets.CIFAR10(str(root), train=split == "train", download=True)
    return ds.data, np.asarray(ds.targets)


def load_cifar10(
    root: str | Path, split: str = "train", download: bool = False, limit: int | None = None
) -> TensorDataset:
    """CIFAR-10 images (N, 3, 32, 32) float32 in [-1, 1] and int64 labels (N,).

    ``root`` is an ``.npz`` (see :func:`load_npz`; the shared ``cifar10_subset.npz`` has
    ``{train,test}_images``/``_labels``), a directory with the python pickle batches
    (``data_batch_1`` ... ``data_batch_5``, ``test_batch``, in ``cifar-10-batches-py/`` or
    directly in it), or torchvision's download with ``download=True``. ``split`` is 'train',
    'test' or 'all' (train then test); ``limit`` keeps the first samples."""
    _check_split(split)
    root = Path(root)
    if root.suffix == ".npz":
        x, y = load_npz(root, split, "CIFAR-10")
    else:
        if not download:
            _check_dir(root, "CIFAR-10")
        x, y = _concat([_cifar_batches(root, s, download) for s in _parts(split)])
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return _dataset(normalize_cifar(x), y)


def load_imagenet(root: str | Path, split: str = "val") -> Dataset:
    """ImageNet from an ImageFolder directory ``root/split/<class>/<image>`` with the usual
    resize-256 / centre-crop-224 / mean-std normalisation (needs torchvision)."""
    tv = _torchvision()
    path = Path(root) / split
    if not path.is_dir():
        raise MissingFileError(f"no ImageFolder directory at {path}")
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
    except ImportError as e:
        raise DependencyError(
            "this needs torchvision, which falcon-prune does not require; install it "
            "(pip install torchvision) or, for MNIST/CIFAR-10, pass local files"
        ) from e
    return torchvision


DATASETS = {"mnist": load_mnist, "cifar10": load_cifar10}


def load_dataset(name: str, root: str | Path, split: str = "train", **kw) -> Dataset:
    """Dispatch by name: 'mnist', 'cifar10' (``split`` 'train', 'test' or 'all') or
    'imagenet' (``split`` is the ImageFolder subdirectory; 'test' means 'val')."""
    if name == "imagenet":
        return load_imagenet(root, "val" if split == "test" else split)
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose mnist, cifar10 or imagenet")
    return DATASETS[name](root, split, **kw)
