"""CIFAR-10 from the standard `cifar-10-batches-py` folder, read with an allow-list unpickler."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ..errors import FedFactoryError
from .base import Dataset

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DEFAULT_ROOT = "~/.cache/fedfactory/cifar-10-batches-py"
# The batches hold dicts of bytes, lists, ints and one numpy array: nothing else may be built.
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store raw bytes
}


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _AllowListUnpickler(f, encoding="bytes").load()
        d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = np.asarray(d["labels"], dtype=np.int64)
    except FileNotFoundError:
        raise FedFactoryError(f"cifar10: {path} not found") from None
    except (pickle.UnpicklingError, EOFError, KeyError, AttributeError, TypeError, ValueError) as e:
        raise FedFactoryError(f"cifar10: {path} is not a valid CIFAR-10 batch: {e}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise FedFactoryError(f"cifar10: {path}: expected data N x 3072 with N labels, got {data.shape}, {labels.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def load(root: str = "", **_) -> Dataset:
    folder = Path(root or DEFAULT_ROOT).expanduser()
    if folder.name != "cifar-10-batches-py" and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    if not folder.is_dir():
        raise FedFactoryError(
            f"cifar10: folder {folder} not found; download and unpack "
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and set data.root to its cifar-10-batches-py folder"
        )
    parts = [read_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    x_te, y_te = read_batch(folder / "test_batch")
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    return Dataset("cifar10", x_tr, y_tr, x_te, y_te, CLASS_NAMES, augment="natural").validate()
