"""Fashion-MNIST in its original IDX .gz files (the Debian package dataset-fashion-mnist)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ..errors import FedFactoryError
from .base import Dataset

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "x_train": "train-images-idx3-ubyte.gz", "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz", "y_test": "t10k-labels-idx1-ubyte.gz",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not): magic 0x0000 08 NDIM, then big-endian int32 dims, then uint8 data."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise FedFactoryError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise FedFactoryError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise FedFactoryError(f"{path}: expected {int(np.prod(dims))} bytes of data for shape {dims}, found {len(raw) - offset}")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def load(root: str = "", **_) -> Dataset:
    root = Path(root or DEFAULT_ROOT)
    arrays = {}
    for key, name in FILES.items():
        path = root / name
        if not path.exists():
            raise FedFactoryError(
                f"fashion-mnist: {path} not found. Install it with "
                "`sudo apt-get install dataset-fashion-mnist`, or set data.root to a folder holding the IDX .gz files"
            )
        arrays[key] = read_idx(path)
    return Dataset(
        "fashion-mnist",
        arrays["x_train"][..., None], arrays["y_train"].astype(np.int64),
        arrays["x_test"][..., None], arrays["y_test"].astype(np.int64),
        CLASS_NAMES, augment="natural",
    )
