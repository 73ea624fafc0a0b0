"""CIFAR-10 from the standard `cifar-10-batches-py` folder, read with an allow-list unpickler.

A batch is a pickle, and a pickle is a program: loading one with pickle.load runs whatever it
names. So nothing outside ALLOWED is ever looked up, and even the allowed numpy names are not
handed to numpy: they build inert stand-ins (_Array, _Dtype) that record their arguments, and
only a plain uint8 or integer array of a checked size is made from them, with np.frombuffer.
numpy's own unpickling code (ndarray.__setstate__) is memory-unsafe on hostile state (an object
array with a short list crashes the interpreter), and the C unpickler lets a 10-byte pickle
allocate gigabytes (a huge memo index), so the pure-Python unpickler runs here, on the bytes of
a file of bounded size.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
from io import BytesIO
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import FedFactoryError
from .base import Dataset, one_line

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DEFAULT_ROOT = "~/.cache/fedfactory/cifar-10-batches-py"
MAX_BATCH_BYTES = 256 << 20  # a real batch file holds 31 MB
# The batches hold dicts of bytes, lists, ints and one numpy array: nothing else may be built.
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store raw bytes
}
# The dtypes a batch's arrays and scalars may have (pixels uint8, labels integers).
DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "b1"}
# What the unpickler and the stand-ins raise on a malformed or hostile pickle.
BAD_PICKLE = (pickle.UnpicklingError, EOFError, KeyError, IndexError, AttributeError, TypeError, ValueError,
              OverflowError, struct.error)


class _NDArrayClass:
    """Stands for numpy.ndarray, which a pickle names only as _reconstruct's first argument."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("refused to call numpy.ndarray")


class _Dtype:
    """numpy.dtype(spec, align, copy), then __setstate__(state): only a plain integer dtype comes out."""

    spec, order = None, "|"

    def __init__(self, spec=None, align=False, copy=False):
        if isinstance(spec, bytes):
            spec = spec.decode("latin-1")
        if not isinstance(spec, str) or spec.lstrip("<>|=") not in DTYPES:
            raise pickle.UnpicklingError(f"refused dtype {str(spec)[:20]!r}")
        self.spec = spec

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError("malformed dtype state")
        self.order = state[1]

    def numpy(self) -> np.dtype:
        if self.spec is None:
            raise pickle.UnpicklingError("a dtype was never initialised")
        order = self.order if self.order in "<>" else "="
        return np.dtype(self.spec.lstrip("<>|=")).newbyteorder(order)


class _Array:
    """_reconstruct(ndarray, shape, typecode), then __setstate__((version, shape, dtype, fortran, bytes))."""

    array = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("malformed array state")
        _, shape, dtype, fortran, raw = state
        if not (isinstance(shape, tuple) and len(shape) <= 4 and all(type(d) is int and d >= 0 for d in shape)):
            raise pickle.UnpicklingError(f"bad array shape {str(shape)[:40]}")
        if not isinstance(dtype, _Dtype) or not isinstance(raw, bytes) or not isinstance(fortran, (bool, int)):
            raise pickle.UnpicklingError("array state must hold a plain dtype and raw bytes")
        dt = dtype.numpy()
        if len(raw) != math.prod(shape) * dt.itemsize:
            raise pickle.UnpicklingError(f"array of shape {shape} {dt} needs {math.prod(shape) * dt.itemsize} bytes, "
                                         f"the pickle holds {len(raw)}")
        self.array = np.frombuffer(raw, dt).reshape(shape, order="F" if fortran else "C")


def _reconstruct(cls, shape, typecode):
    if cls is not _NDArrayClass:
        raise pickle.UnpicklingError("_reconstruct may only build numpy.ndarray")
    return _Array()


def _scalar(dtype, raw):
    if not isinstance(dtype, _Dtype) or not isinstance(raw, bytes):
        raise pickle.UnpicklingError("malformed numpy scalar")
    dt = dtype.numpy()
    if len(raw) != dt.itemsize:
        raise pickle.UnpicklingError(f"a {dt} scalar needs {dt.itemsize} bytes, the pickle holds {len(raw)}")
    return np.frombuffer(raw, dt)[0].item()


def _encode(text, encoding="utf-8", errors="strict"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refused _codecs.encode other than latin1 of a string")
    return text.encode("latin-1")


_STAND_INS = {"_reconstruct": _reconstruct, "ndarray": _NDArrayClass, "dtype": _Dtype, "scalar": _scalar,
              "encode": _encode}


def _refuse_bytearray(self):
    raise pickle.UnpicklingError("refused BYTEARRAY8 (it allocates the size it claims)")


def _build(self):
    """BUILD only on the stand-ins: on anything else it would set attributes (even on these classes)."""
    state = self.stack.pop()
    inst = self.stack[-1]
    if type(inst) not in (_Array, _Dtype):
        raise pickle.UnpicklingError(f"refused to set the state of a {type(inst).__name__}")
    inst.__setstate__(state)


class _AllowListUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its memo is a dict
    dispatch: ClassVar[dict] = {**pickle._Unpickler.dispatch, pickle.BYTEARRAY8[0]: _refuse_bytearray,
                                pickle.BUILD[0]: _build}

    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {str(module)[:60]}.{str(name)[:60]}")
        return _STAND_INS[name]


def _labels(v, n: int, where: str) -> np.ndarray:
    if isinstance(v, _Array) and v.array is not None and v.array.ndim == 1 and v.array.dtype.kind in "iu":
        labels = v.array.astype(np.int64)
    elif isinstance(v, list) and all(type(c) is int for c in v):
        labels = np.array([c if 0 <= c < len(CLASS_NAMES) else -1 for c in v], np.int64)
    else:
        raise FedFactoryError(f"{where}: labels must be a list of integers")
    if len(labels) != n:
        raise FedFactoryError(f"{where}: {n} images but {len(labels)} labels")
    if n and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise FedFactoryError(f"{where}: labels must be class ids in [0, {len(CLASS_NAMES)})")
    return labels


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    where = f"cifar10: {path}"
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_BATCH_BYTES:  # before reading: read(n) would allocate n
                raise FedFactoryError(f"{where}: larger than {MAX_BATCH_BYTES >> 20} MiB; a CIFAR-10 batch holds 31 MB")
            raw = f.read()
    except FileNotFoundError:
        raise FedFactoryError(f"cifar10: {path} not found") from None
    except OSError as e:
        raise FedFactoryError(f"{where}: cannot read: {one_line(e)}") from None
    if len(raw) > MAX_BATCH_BYTES:
        raise FedFactoryError(f"{where}: larger than {MAX_BATCH_BYTES >> 20} MiB; a CIFAR-10 batch holds 31 MB")
    try:
        d = _AllowListUnpickler(BytesIO(raw), encoding="bytes").load()
    except BAD_PICKLE as e:
        raise FedFactoryError(f"{where} is not a valid CIFAR-10 batch: {type(e).__name__}: {one_line(e)}") from None
    if not isinstance(d, dict):
        raise FedFactoryError(f"{where}: a batch must be a pickled dict, got {type(d).__name__}")
    d = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise FedFactoryError(f"{where} is not a valid CIFAR-10 batch: no 'data' or no 'labels'")
    data = d["data"].array if isinstance(d["data"], _Array) else None
    if data is None or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(d["data"]).__name__)
        raise FedFactoryError(f"cifar10: {path}: expected data uint8 N x 3072, got {shape}")
    labels = _labels(d["labels"], len(data), where)
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
