"""A site's own labelled images: an ImageFolder directory, a `path,label` CSV or a .npz file.

Images may be PNG/JPEG/TIFF/... or DICOM (one frame each, made 8-bit by data/dicom.py).

Labels come back as global class ids: a class's index in the federation's `class_names`, which the
config fixes, so sites agree on ids without seeing each other's data.
"""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import FedFactoryError
from .base import BAD_IMAGE, as_labels, as_nhwc, one_line, resize_images
from .npz import read_npz

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DICOM_EXTENSIONS = (".dcm", ".dicom")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
NPZ_KEYS = {
    "train": (("x_train", "y_train"), ("train_images", "train_labels"), ("images", "labels")),
    "test": (("x_test", "y_test"), ("test_images", "test_labels"), ("images", "labels")),
}


def load_labelled(source: str | Path, class_names: list[str], split: str = "train", size: int = 0,
                  channels: int = 0, *, max_bytes: int = 8 << 30) -> tuple[np.ndarray, np.ndarray]:
    """A site's own images (or a test set) from a folder or file -> (uint8 N x H x W x C, int64 global ids)."""
    if channels not in (0, 1, 3):
        raise FedFactoryError(f"channels must be 0 (automatic), 1 or 3, got {channels!r}")
    if not class_names or len(set(class_names)) != len(class_names):
        raise FedFactoryError(f"the federation's class list must be non-empty without duplicates, got {class_names}")
    p = Path(source).expanduser()
    if p.is_dir():
        return _images(_folder_items(p, class_names), f"folder {p}", size, channels, max_bytes)
    if p.is_file() and p.suffix.lower() == ".csv":
        return _images(_csv_items(p, class_names), f"CSV {p}", size, channels, max_bytes)
    if p.is_file() and p.suffix.lower() == ".npz":
        return _npz(p, class_names, split, size, channels, max_bytes)
    problem = "does not exist" if not p.exists() else "is not a supported source"
    raise FedFactoryError(f"{p} {problem}: expected a folder with one subfolder per class, "
                          f"a .csv file with columns path,label, or a .npz file")


def _folder_items(root: Path, class_names: list[str]) -> list[tuple[Path, int]]:
    ids = {name: i for i, name in enumerate(class_names)}
    try:
        subs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        for sub in subs:
            if sub.name not in ids:
                raise FedFactoryError(f"folder {sub} holds class {sub.name!r}, which is not in the federation's "
                                      f"class list {class_names}")
        return [(sub / name, ids[sub.name]) for sub in sorted(subs, key=lambda d: ids[d.name])
                for name in sorted(f.name for f in sub.iterdir() if not f.name.startswith(".") and _is_image(f))]
    except OSError as e:
        raise FedFactoryError(f"cannot list folder {root}: {one_line(e)}") from None


def _csv_items(path: Path, class_names: list[str], need_labels: bool = True) -> list[tuple[Path, int]]:
    """(file, global id) per row; without need_labels a CSV of paths alone is read too, with id -1."""
    ids = {name: i for i, name in enumerate(class_names)}
    items = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            labelled = "label" in (reader.fieldnames or ())
            if "path" not in (reader.fieldnames or ()) or (need_labels and not labelled):
                raise FedFactoryError(f"{path}: the header row must be 'path,label'{'' if need_labels else ' or path'}, "
                                      f"got {reader.fieldnames}")
            for row in reader:
                where, label = f"{path} row {reader.line_num}", (row.get("label") or "").strip()
                if not labelled:
                    gid = -1
                elif label in ids:
                    gid = ids[label]
                else:
                    try:
                        gid = int(label)
                    except ValueError:
                        gid = -1
                    if not 0 <= gid < len(class_names):
                        raise FedFactoryError(f"{where}: label {label!r} is neither a class in {class_names} "
                                              f"nor a class id in [0, {len(class_names)})")
                file = path.parent / (row["path"] or "").strip()
                if not row["path"] or not file.is_file():
                    raise FedFactoryError(f"{where}: image file {file} not found")
                items.append((file, gid))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FedFactoryError(f"cannot read CSV {path}: {one_line(e)}") from None
    return items


def labelled_files(source: str | Path, class_names: list[str]) -> list[tuple[Path, int]]:
    """The (file, global class id) pairs of class folders or a CSV, in load_labelled's order; a CSV of
    paths alone gives id -1."""
    p = Path(source).expanduser()
    return _csv_items(p, class_names, need_labels=False) if p.suffix.lower() == ".csv" else _folder_items(p, class_names)


def image_files(folder: str | Path) -> list[Path]:
    """Every image or DICOM file below a folder, at any depth, in sorted order (hidden entries skipped)."""
    def fail(e: OSError):
        raise FedFactoryError(f"cannot list folder {e.filename}: {one_line(e)}")

    found = []
    for top, subs, files in os.walk(Path(folder).expanduser(), onerror=fail):
        subs[:] = sorted(d for d in subs if not d.startswith("."))
        found += [Path(top) / f for f in sorted(files) if not f.startswith(".") and _is_image(Path(top) / f)]
    return found


def load_files(paths: list, size: int, channels: int, where: str = "", *, max_bytes: int = 8 << 30) -> np.ndarray:
    """Image files with no labels -> uint8 N x size x size x C, read and resized as load_labelled reads a site's."""
    return _images([(Path(p), -1) for p in paths], where or f"the {len(paths)} image files", size, channels,
                   max_bytes)[0]


def load_npz_images(path: str | Path, class_names: list[str], size: int, channels: int,
                    *, max_bytes: int = 8 << 30) -> tuple[np.ndarray, np.ndarray | None]:
    """An .npz's test images (as load_labelled's split "test"), with their labels when it holds them."""
    path = Path(path).expanduser()
    arrays = read_npz(path, max_bytes=8 * max_bytes)
    if any(all(k in arrays for k in keys) for keys in NPZ_KEYS["test"]):
        return _npz(path, class_names, "test", size, channels, max_bytes, arrays)
    key = next((keys[0] for keys in NPZ_KEYS["test"] if keys[0] in arrays), None)
    if key is None:
        raise FedFactoryError(f"{path}: no test images; expected one of {[k[0] for k in NPZ_KEYS['test']]}, "
                              f"found {sorted(arrays)[:20]}")
    x = as_nhwc(arrays[key], f"{path} {key}")
    if len(x) == 0:
        raise FedFactoryError(f"{path}: {key} holds no images")
    return _conform(x, size, channels, str(path), max_bytes), None


def _is_image(path: Path) -> bool:
    return path.is_file() and (path.suffix.lower() in IMAGE_EXTENSIONS or _is_dicom(path))


def _is_dicom(path: Path) -> bool:
    """A .dcm/.dicom file, or a file of no image extension (not a DICOMDIR) with the DICM preamble."""
    suffix = path.suffix.lower()
    if suffix in DICOM_EXTENSIONS or suffix in IMAGE_EXTENSIONS or path.name.upper() == "DICOMDIR":
        return suffix in DICOM_EXTENSIONS
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _read(path: Path, fn, max_bytes: int, head: bool = False):
    """Run fn on the opened image, or with head on its header only (mode, size); any failure to decode this
    file becomes a FedFactoryError naming it. A DICOM file's pixel data is checked against max_bytes first."""
    if _is_dicom(path):
        from .dicom import read_header, read_image  # pydicom is imported only where a site has DICOM files

        header = read_header(path)
        _check_bytes(header.nbytes, f"DICOM file {path}", max_bytes, what="its pixel data", fix="")
        return fn(header if head else read_image(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return fn(im)
    except BAD_IMAGE as e:
        raise FedFactoryError(f"cannot read image {path}: {type(e).__name__}: {one_line(e)}") from None


def _images(items, where: str, size: int, channels: int, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    if not items:
        raise FedFactoryError(f"{where} holds no images ({', '.join(IMAGE_EXTENSIONS + DICOM_EXTENSIONS)})")
    heads = [_read(path, lambda im: (im.mode, im.size), max_bytes, head=True)  # headers only: cheap
             for path, _ in items]
    if not channels:
        channels = 1 if all(mode in GREY_MODES for mode, _ in heads) else 3
    if size > 0:
        h = w = size
    else:
        sizes = sorted({wh for _, wh in heads})
        if len(sizes) > 1:
            raise FedFactoryError(f"{where}: images differ in size ({', '.join(f'{a}x{b}' for a, b in sizes[:5])}"
                                  f"{', ...' if len(sizes) > 5 else ''}); set data.size to resize them all")
        w, h = sizes[0]
    _check_bytes(len(items) * h * w * channels, where, max_bytes)
    mode, x = ("L" if channels == 1 else "RGB"), np.empty((len(items), h, w, channels), np.uint8)

    def pixels(im):
        im = im.convert(mode)
        return np.asarray(im if im.size == (w, h) else im.resize((w, h), Image.BILINEAR), np.uint8)

    for i, (path, _) in enumerate(items):
        x[i] = _read(path, pixels, max_bytes).reshape(h, w, channels)
    return x, np.array([gid for _, gid in items], np.int64)


def _npz(path: Path, class_names: list[str], split: str, size: int, channels: int,
         max_bytes: int, arrays: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    if split not in NPZ_KEYS:
        raise FedFactoryError(f"{path}: split must be 'train' or 'test', got {split!r}")
    if arrays is None:  # checked before reading; 8: float64 pixels shrink to uint8
        arrays = read_npz(path, max_bytes=8 * max_bytes)
    keys = next((k for k in NPZ_KEYS[split] if all(key in arrays for key in k)), None)
    if keys is None:
        raise FedFactoryError(f"{path}: no {split} arrays; expected one of "
                              f"{[list(k) for k in NPZ_KEYS[split]]}, found {sorted(arrays)[:20]}")
    x, y = as_nhwc(arrays[keys[0]], f"{path} {keys[0]}"), as_labels(arrays[keys[1]], f"{path} {keys[1]}")
    if len(x) != len(y) or len(x) == 0:
        raise FedFactoryError(f"{path}: {len(x)} images and {len(y)} labels in {list(keys)}; need the same, non-zero")
    if y.min() < 0 or y.max() >= len(class_names):
        raise FedFactoryError(f"{path}: {keys[1]} out of range [0, {len(class_names)}) of the federation's "
                              f"class list: min {y.min()}, max {y.max()}")
    return _conform(x, size, channels, str(path), max_bytes), y


def _conform(x: np.ndarray, size: int, channels: int, where: str, max_bytes: int) -> np.ndarray:
    """Arrays resized to size x size and made grey or colour, as a folder's files would be."""
    c = channels or x.shape[-1]
    h, w = (size, size) if size > 0 else x.shape[1:3]
    _check_bytes(len(x) * h * w * c, where, max_bytes)
    x = resize_images(x, size)
    if c == 3 and x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    elif c == 1 and x.shape[-1] == 3:
        x = np.stack([np.asarray(Image.fromarray(img).convert("L")) for img in x])[..., None]
    return np.ascontiguousarray(x)


def _check_bytes(n: int, where: str, max_bytes: int, what: str = "the images",
                 fix: str = "; use a smaller data.size or fewer images") -> None:
    if n > max_bytes:
        raise FedFactoryError(f"{where}: {what} would take {n / 2**30:.2f} GiB, above the cap of "
                              f"{max_bytes / 2**30:.2f} GiB{fix}")
