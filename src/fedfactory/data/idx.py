"""Fashion-MNIST in its original IDX .gz files (the Debian package dataset-fashion-mnist)."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import FedFactoryError
from .base import Dataset, one_line

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "x_train": "train-images-idx3-ubyte.gz", "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz", "y_test": "t10k-labels-idx1-ubyte.gz",
}
MAX_NDIM = 16        # numpy arrays have at most 64; IDX data sets use 1 to 4
MAX_BYTES = 4 << 30  # the data one IDX file may declare (Fashion-MNIST's largest holds 47 MB)


def read_idx(path: Path, max_bytes: int = MAX_BYTES) -> np.ndarray:
    """Read an IDX file (gzipped or not): magic 0x0000 08 NDIM, then big-endian int32 dims, then uint8 data.

    The declared size is checked (against the file's size, or for .gz against `max_bytes`) before
    the data is read, and a .gz file is never decompressed past what its header declares."""
    path = Path(path)
    try:
        gz = path.suffix == ".gz"
        with (gzip.open if gz else open)(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:3] != b"\x00\x00\x08":
                raise FedFactoryError(f"{path} is not an IDX file of unsigned bytes")
            ndim = head[3]
            if ndim > MAX_NDIM:
                raise FedFactoryError(f"{path}: {ndim} dimensions declared; an IDX file here has at most {MAX_NDIM}")
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise FedFactoryError(f"{path}: truncated IDX header ({ndim} dimensions declared)")
            dims = struct.unpack(f">{ndim}i", raw_dims)
            if any(d < 0 for d in dims):
                raise FedFactoryError(f"{path}: negative dimension in the IDX header {dims}")
            n, offset = math.prod(dims), 4 + 4 * ndim
            if not gz and os.fstat(f.fileno()).st_size - offset != n:
                raise FedFactoryError(f"{path}: expected {n} bytes of data for shape {dims}, "
                                      f"found {os.fstat(f.fileno()).st_size - offset}")
            if math.prod(max(d, 1) for d in dims) > max_bytes:  # (zeros aside: numpy refuses such shapes even when empty)
                raise FedFactoryError(f"{path}: shape {dims} is too large: the cap is {max_bytes:,} bytes")
            chunks, got = [], 0
            while got <= n:  # one byte past the declared size: a longer file is refused, a .gz is checked to its end
                chunk = f.read(min(1 << 20, n + 1 - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise FedFactoryError(f"cannot read {path}: {type(e).__name__}: {one_line(e)}") from None
    if got != n:
        raise FedFactoryError(f"{path}: expected {n} bytes of data for shape {dims}, found {'more' if got > n else got}")
    return np.frombuffer(b"".join(chunks), np.uint8).reshape(dims)


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
        want = 3 if key.startswith("x") else 1
        if arrays[key].ndim != want:
            raise FedFactoryError(f"fashion-mnist: {path} holds an array of shape {arrays[key].shape}, "
                                  f"expected {'N x H x W images' if want == 3 else 'N labels'}")
    return Dataset(
        "fashion-mnist",
        arrays["x_train"][..., None], arrays["y_train"].astype(np.int64),
        arrays["x_test"][..., None], arrays["y_test"].astype(np.int64),
        CLASS_NAMES, augment="natural",
    ).validate()
