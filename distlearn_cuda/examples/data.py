"""Data for the examples: scikit-learn's digits or MNIST IDX files, split across ranks.

Every rank loads the same data and keeps its own part of it; nothing travels
between ranks.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CIFAR10_URL",
    "Dataset",
    "load_cifar10",
    "load_digits",
    "load_mnist",
    "partition",
    "read_idx",
]

_IDX_UBYTE = 0x08
NUM_CLASSES = 10


@dataclass(frozen=True)
class Dataset:
    """Images as float32 ``(N, C, H, W)``, normalized; labels as int64 ``(N,)`` in 0..9."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> Dataset:
        """The samples at ``indices``."""
        return Dataset(self.images[indices], self.labels[indices])

    def to(self, device: torch.device) -> Dataset:
        """The samples on ``device``."""
        return Dataset(self.images.to(device), self.labels.to(device))


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> tuple[Dataset, Dataset]:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, no download).

    Returns (train, test), split the same way on every rank for a given
    ``seed``, stratified by class, and normalized with the training set's
    mean and standard deviation.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.images,
        digits.target,
        test_size=test_fraction,
        random_state=seed,
        stratify=digits.target,
    )
    return _normalized(train_x, train_y, test_x, test_y)


def load_mnist(data_dir: str | Path) -> tuple[Dataset, Dataset]:
    """MNIST from the four IDX files in ``data_dir``, each optionally gzipped.

    Returns (train, test), normalized with the training set's mean and
    standard deviation.
    """
    data_dir = Path(data_dir)
    train = _idx_pair(data_dir, "train")
    test = _idx_pair(data_dir, "t10k")
    return _normalized(*train, *test)


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
# What the python-version batches pickle: dicts of bytes keys holding numpy
# arrays and lists. Nothing else may be unpickled from a data directory.
_CIFAR10_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def load_cifar10(data_dir: str | Path) -> tuple[Dataset, Dataset]:
    """CIFAR-10 from the python-version batches (``data_batch_1`` to ``5`` and
    ``test_batch``, as extracted from ``cifar-10-python.tar.gz``) in
    ``data_dir`` or its ``cifar-10-batches-py`` subdirectory.

    Returns (train, test): images ``(N, 3, 32, 32)`` normalized per channel
    with the training set's mean and standard deviation.

    Raises:
        FileNotFoundError: a batch file is missing (the message says where
            to get them).
        ValueError: naming the file, for a batch that is not CIFAR-10's.
    """
    data_dir = Path(data_dir)
    if not (data_dir / "test_batch").exists() and (data_dir / "cifar-10-batches-py").is_dir():
        data_dir = data_dir / "cifar-10-batches-py"
    missing = [name for name in _CIFAR10_FILES if not (data_dir / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{data_dir}: no CIFAR-10 batches ({', '.join(missing)} missing); download "
            f"{CIFAR10_URL} and extract it there"
        )
    parts = [_cifar10_batch(data_dir / name) for name in _CIFAR10_FILES]
    train_x = np.concatenate([x for x, _ in parts[:-1]])
    train_y = np.concatenate([y for _, y in parts[:-1]])
    test_x, test_y = parts[-1]
    train_images = torch.as_tensor(train_x, dtype=torch.float32)
    mean = train_images.mean(dim=(0, 2, 3), keepdim=True)
    std = train_images.std(dim=(0, 2, 3), keepdim=True)

    def dataset(x: np.ndarray, y: np.ndarray) -> Dataset:
        images = (torch.as_tensor(x, dtype=torch.float32) - mean) / std
        return Dataset(images, torch.as_tensor(y, dtype=torch.int64))

    return dataset(train_x, train_y), dataset(test_x, test_y)


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR10_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR-10 batch")
        return super().find_class(module, name)


def _cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch: uint8 images (N, 3, 32, 32) and labels (N,)."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, TypeError, EOFError) as error:
        raise ValueError(f"{path}: not a CIFAR-10 python-version batch ({error})") from error
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: images of shape {data.shape}, expected (N, 3072)")
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(labels)} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an IDX file of unsigned bytes (gzip-compressed when named ``*.gz``).

    The format: two zero bytes, the dtype code (0x08 for unsigned bytes), the
    number of dimensions, each dimension as a big-endian uint32, then the data.

    Raises:
        ValueError: naming the file, for a bad magic number or a data size
            that does not match the dimensions.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = bytearray(f.read())  # writable, so torch can take the array as is
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE:
        raise ValueError(
            f"{path}: not an IDX file of unsigned bytes (magic number {raw[:4].hex()!r}, "
            f"expected '0000080N')"
        )
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path}: truncated header ({len(raw)} bytes, expected {header_size})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    found = len(raw) - header_size
    if found != expected:
        problem = "truncated" if found < expected else "too long"
        raise ValueError(
            f"{path}: {problem}: {found} data bytes for shape {shape}, expected {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def partition(
    n: int, rank: int, world_size: int, *, uneven: bool = False, seed: int = 0
) -> torch.Tensor:
    """The indices of ``rank``'s part of ``n`` samples.

    The parts are disjoint and cover all samples, drawn from one permutation
    that every rank computes alike from ``seed``. Even parts differ in size by
    at most one; with ``uneven``, rank r's part is proportional to r + 1.
    """
    weights = torch.arange(1, world_size + 1) if uneven else torch.ones(world_size)
    bounds = (n * weights.cumsum(0) / weights.sum()).round().long().tolist()
    start = bounds[rank - 1] if rank > 0 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[start : bounds[rank]]


def _idx_pair(data_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of one MNIST split, checked against each other."""
    images_path = _find(data_dir, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(data_dir, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(
            f"{images_path}: expected 3 dimensions (N, rows, cols), got {images.shape}"
        )
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected 1 dimension (N,), got {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(
            f"{labels_path}: {len(labels)} labels for the {len(images)} images in {images_path}"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise ValueError(f"{labels_path}: label {labels.max()} is not a digit 0..9")
    return images, labels


def _find(data_dir: Path, name: str) -> Path:
    """``data_dir/name``, or its gzipped ``name.gz``."""
    for path in (data_dir / name, data_dir / f"{name}.gz"):
        if path.exists():
            return path
    raise FileNotFoundError(f"{data_dir}: neither {name} nor {name}.gz found")


def _normalized(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
) -> tuple[Dataset, Dataset]:
    """Datasets with images scaled by the training set's pixel mean and std."""
    train_images = torch.as_tensor(train_x, dtype=torch.float32)
    mean, std = train_images.mean(), train_images.std()

    def dataset(x: np.ndarray, y: np.ndarray) -> Dataset:
        images = (torch.as_tensor(x, dtype=torch.float32) - mean) / std
        return Dataset(images.unsqueeze(1), torch.as_tensor(y, dtype=torch.int64))

    return dataset(train_x, train_y), dataset(test_x, test_y)
