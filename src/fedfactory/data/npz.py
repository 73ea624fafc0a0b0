"""NumPy .npz files: `x_train, y_train, x_test, y_test`, or the MedMNIST keys.

A downloaded .npz is data from someone else, so it is read here rather than by np.load: each
member's .npy header is parsed without eval (no object arrays, no structured dtypes), the size it
declares is checked against the member's size and a byte cap before anything is allocated, and
every failure becomes a FedFactoryError naming the file.
"""

from __future__ import annotations

import math
import os
import re
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import FedFactoryError
from .base import Dataset, as_labels, as_nhwc, one_line, resize_images

try:
    from lzma import LZMAError
except ImportError:  # a Python built without lzma: zipfile cannot open LZMA members either
    LZMAError = OSError

MEDMNIST_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
PLAIN_KEYS = ("x_train", "y_train", "x_test", "y_test")
MAX_CLASSES = 10_000  # an npz data set without class names gets one per label value up to its largest
NPY_MAGIC = b"\x93NUMPY"
MAX_HEADER = 10_000   # numpy's own limit on a .npy header
# The header numpy writes: {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), } (Python 2 wrote 4L)
_HEADER = re.compile(r"\{\s*'descr'\s*:\s*'(?P<descr>[^'\\]{1,40})'\s*,\s*'fortran_order'\s*:\s*(?P<fortran>True|False)"
                     r"\s*,\s*'shape'\s*:\s*\((?P<shape>[0-9L,\s]{0,400})\)\s*,?\s*\}\s*")
_DESCR = re.compile(r"[<>|=]?[a-zA-Z][0-9]{0,10}(?:\[[a-zA-Z0-9]{1,8}\])?")  # a plain type string, e.g. |u1 or <M8[s]
# What reading a zip member can raise when the archive is corrupt (zipfile, zlib, bz2, lzma).
BAD_ZIP = (zipfile.BadZipFile, zlib.error, LZMAError, OSError, EOFError, ValueError, NotImplementedError, struct.error)


def read_npy_header(f, where: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, header length) of a .npy stream, parsed with a regular expression,
    never eval: anything but a plain numeric, string or time dtype and a tuple of sizes is refused."""
    magic = f.read(8)
    if len(magic) < 8 or magic[:6] != NPY_MAGIC:
        raise FedFactoryError(f"{where}: not a .npy array (bad magic)")
    major, size_bytes = magic[6], {1: 2, 2: 4, 3: 4}.get(magic[6])
    if size_bytes is None:
        raise FedFactoryError(f"{where}: unknown .npy format version {major}")
    raw = f.read(size_bytes)
    if len(raw) < size_bytes:
        raise FedFactoryError(f"{where}: truncated .npy header")
    length = int.from_bytes(raw, "little")
    if length > MAX_HEADER:
        raise FedFactoryError(f"{where}: .npy header of {length} bytes is too large")
    raw = f.read(length)
    if len(raw) < length:
        raise FedFactoryError(f"{where}: truncated .npy header")
    try:
        text = raw.decode("utf-8" if major == 3 else "latin-1")
    except UnicodeDecodeError:
        raise FedFactoryError(f"{where}: the .npy header is not text") from None
    m = _HEADER.fullmatch(text)
    if m is None or not _DESCR.fullmatch(m["descr"]):
        raise FedFactoryError(f"{where}: unsupported .npy header {text.strip()[:80]!r} "
                              "(only plain arrays: no object or structured dtypes)")
    try:
        dtype = np.dtype(m["descr"])
    except (TypeError, ValueError) as e:
        raise FedFactoryError(f"{where}: unknown dtype {m['descr']!r}: {one_line(e)}") from None
    if dtype.hasobject or dtype.itemsize == 0 or dtype.fields is not None or dtype.subdtype is not None:
        raise FedFactoryError(f"{where}: dtype {dtype} is not a plain array (object arrays are never unpickled)")
    parts = m["shape"].split(",")
    if parts and not parts[-1].strip():
        parts = parts[:-1]
    if any(not re.fullmatch(r"\s*[0-9]{1,19}L?\s*", p) for p in parts):
        raise FedFactoryError(f"{where}: bad shape ({m['shape'][:80]}) in the .npy header")
    shape = tuple(int(p.strip().rstrip("L")) for p in parts)
    return shape, m["fortran"] == "True", dtype, len(magic) + size_bytes + length


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 64 << 30


def read_npz(path: Path, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz file. Declared sizes are checked against each member's size and, in all,
    against `max_bytes` (default: the machine's memory) before anything is allocated."""
    if not path.exists():
        raise FedFactoryError(f"{path} not found")
    cap = _physical_memory() if max_bytes is None else max_bytes
    arrays, total = {}, 0
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy") or info.is_dir():
                    continue  # np.savez writes only .npy members
                key = info.filename[:-4]
                where = f"{path} array {key[:60]!r}"
                if info.flag_bits & 0x1:
                    raise FedFactoryError(f"{where}: encrypted members are not supported")
                with z.open(info) as f:
                    shape, fortran, dtype, offset = read_npy_header(f, where)
                    n = math.prod(shape) * dtype.itemsize
                    if info.file_size - offset != n:
                        raise FedFactoryError(f"{where}: the header declares {shape} {dtype} ({n:,} bytes), "
                                              f"the member holds {max(info.file_size - offset, 0):,}")
                    total += n
                    if total > cap:
                        raise FedFactoryError(f"{path}: its arrays would take {total / 2**30:.2f} GiB, above the cap "
                                              f"of {cap / 2**30:.2f} GiB")
                    out = np.empty(n, np.uint8)  # filled from the member: never more than it really holds
                    view, got = memoryview(out), 0
                    while got < n:
                        chunk = f.read(min(1 << 24, n - got))
                        if not chunk:
                            break
                        view[got:got + len(chunk)] = chunk
                        got += len(chunk)
                    if got != n:
                        raise FedFactoryError(f"{where}: truncated: {got:,} of {n:,} bytes")
                arrays[key] = out.view(dtype).reshape(shape, order="F" if fortran else "C")
    except BAD_ZIP as e:
        raise FedFactoryError(f"{path} is not a readable .npz file: {type(e).__name__}: {one_line(e)}") from None
    return arrays


def from_arrays(name: str, arrays: dict, where: str, size: int = 0, class_names=None,
                augment: str = "natural") -> Dataset:
    keys = PLAIN_KEYS if all(k in arrays for k in PLAIN_KEYS) else MEDMNIST_KEYS
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise FedFactoryError(
            f"{where}: missing arrays {missing}; expected {list(PLAIN_KEYS)} or {list(MEDMNIST_KEYS)}, found {sorted(arrays)[:20]}"
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
        if top >= MAX_CLASSES:
            raise FedFactoryError(f"{where}: labels go up to {top}; an npz data set may have at most {MAX_CLASSES} classes")
        class_names = [f"class {i}" for i in range(top + 1)]
    return Dataset(name, resize_images(x_tr, size), y_tr, resize_images(x_te, size), y_te,
                   list(class_names), augment=augment).validate()


def load(path: str, size: int = 0, **_) -> Dataset:
    p = Path(path).expanduser()
    return from_arrays(f"npz:{path}", read_npz(p), str(p), size=size)
