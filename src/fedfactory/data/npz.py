"""NumPy .npz files: `x_train, y_train, x_test, y_test`, or the MedMNIST keys."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import FedFactoryError
from .base import Dataset, as_labels, as_nhwc, resize_images

MEDMNIST_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
PLAIN_KEYS = ("x_train", "y_train", "x_test", "y_test")


def read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise FedFactoryError(f"{path} not found")
    try:
        with np.load(path, allow_pickle=False) as f:  # never unpickle: object arrays are refused
            return {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise FedFactoryError(f"{path} is not a readable .npz file: {e}") from None


def from_arrays(name: str, arrays: dict, where: str, size: int = 0, class_names=None,
                augment: str = "natural") -> Dataset:
    keys = PLAIN_KEYS if all(k in arrays for k in PLAIN_KEYS) else MEDMNIST_KEYS
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise FedFactoryError(
            f"{where}: missing arrays {missing}; expected {list(PLAIN_KEYS)} or {list(MEDMNIST_KEYS)}, found {sorted(arrays)}"
        )
    x_tr, y_tr, x_te, y_te = (arrays[k] for k in keys)
    for y in (y_tr, y_te):
        if np.ndim(y) == 2 and np.shape(y)[1] > 1:
            raise FedFactoryError(
                f"{where}: labels have shape {np.shape(y)}: multi-label data (e.g. ChestMNIST) is not supported"
            )
    x_tr, x_te = as_nhwc(x_tr, f"{where} train images"), as_nhwc(x_te, f"{where} test images")
    y_tr, y_te = as_labels(y_tr, f"{where} train labels"), as_labels(y_te, f"{where} test labels")
    if len(y_tr) != len(x_tr) or len(y_te) != len(x_te):
        raise FedFactoryError(
            f"{where}: {len(x_tr)}/{len(x_te)} train/test images but {len(y_tr)}/{len(y_te)} labels"
        )
    if len(y_tr) == 0:
        raise FedFactoryError(f"{where}: the training set is empty")
    if class_names is None:
        top = max(int(y_tr.max()), int(y_te.max()) if len(y_te) else 0)
        class_names = [f"class {i}" for i in range(top + 1)]
    return Dataset(name, resize_images(x_tr, size), y_tr, resize_images(x_te, size), y_te,
                   list(class_names), augment=augment).validate()


def load(path: str, size: int = 0, **_) -> Dataset:
    p = Path(path).expanduser()
    return from_arrays(f"npz:{path}", read_npz(p), str(p), size=size)
