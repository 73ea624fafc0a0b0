"""The one data type every loader returns, and the checks that keep bad input out."""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import FedFactoryError

# What Pillow raises on bad, truncated or oversized files (its bomb warning is made an error where
# images are read). Every loader that decodes an image catches exactly these.
BAD_IMAGE = (OSError, ValueError, SyntaxError, EOFError, TypeError, IndexError, struct.error,
             Image.DecompressionBombError, Image.DecompressionBombWarning)
# Array kinds that can hold pixels or class ids: bool, signed and unsigned integers, floats.
NUMERIC_KINDS = "biuf"


def one_line(e: BaseException) -> str:
    """An exception's message on one line (numpy's and Pillow's may span several)."""
    return " ".join(str(e).split())[:300]


@dataclass
class Dataset:
    """Images are uint8 N x H x W x C, labels int64 in [0, num_classes)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    augment: str = "natural"  # natural (flips+crops) | dihedral (flips+90-degree rotations) | none
    groups_train: np.ndarray | None = None  # natural client id per training image (e.g. ISIC center)
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def validate(self) -> "Dataset":
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.ndim != 4 or x.shape[-1] not in (1, 3):
                raise FedFactoryError(
                    f"{self.name}: {split} images must be N x H x W x C with C in (1, 3), got shape {x.shape}"
                )
            if x.dtype != np.uint8:
                raise FedFactoryError(f"{self.name}: {split} images must be uint8, got {x.dtype}")
            if min(x.shape[1:3]) < 1:
                raise FedFactoryError(f"{self.name}: {split} images must be at least 1 x 1 pixels, got shape {x.shape}")
            if y.ndim != 1 or len(y) != len(x):
                raise FedFactoryError(
                    f"{self.name}: {split} labels must be one per image, got {y.shape} for {len(x)} images"
                )
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise FedFactoryError(
                    f"{self.name}: {split} labels out of range [0, {self.num_classes}): "
                    f"min {y.min()}, max {y.max()}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise FedFactoryError(
                f"{self.name}: train and test images differ in shape: {self.x_train.shape[1:]} vs {self.x_test.shape[1:]}"
            )
        if len(self.x_train) == 0:
            raise FedFactoryError(f"{self.name}: the training set is empty")
        return self


@dataclass
class LabelledImages:
    """A labelled image set: a site's own training images, or the server's test set."""

    name: str
    images: np.ndarray   # uint8 N x H x W x C
    labels: np.ndarray   # int64 global class ids
    class_names: list[str]
    augment: str = "natural"  # the classifier's augmentation policy when classifier.augment is "auto"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


def cap_per_class(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Sorted indices of at most k seeded-random images per class (toy runs and tests)."""
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:k] for c in np.unique(y)]))


def as_nhwc(x: np.ndarray, where: str) -> np.ndarray:
    """N x H x W (grey) or N x H x W x C -> uint8 N x H x W x C."""
    x = np.asarray(x)
    if x.dtype.kind not in NUMERIC_KINDS:
        raise FedFactoryError(f"{where}: images must hold numbers, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise FedFactoryError(f"{where}: images must be N x H x W or N x H x W x C (C = 1 or 3), got shape {x.shape}")
    if min(x.shape[1:3]) < 1:
        raise FedFactoryError(f"{where}: images must be at least 1 x 1 pixels, got shape {x.shape}")
    if x.dtype != np.uint8:
        if x.dtype.kind == "b":
            x = x.astype(np.uint8)
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise FedFactoryError(f"{where}: images hold NaN or infinite values")
        if np.issubdtype(x.dtype, np.floating) and x.size and x.max() <= 1.0 and x.min() >= 0.0:
            x = np.round(x * 255.0)
        x = np.clip(x, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x)


def as_labels(y: np.ndarray, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype.kind not in NUMERIC_KINDS:
        raise FedFactoryError(f"{where}: labels must be integers, got dtype {y.dtype}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise FedFactoryError(f"{where}: labels must be N or N x 1, got shape {y.shape} (multi-label data is not supported)")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and np.all(np.mod(y, 1) == 0)):
        raise FedFactoryError(f"{where}: labels must be integers")
    if y.size and (y.max() > 2 ** 62 or y.min() < -(2 ** 62)):  # int64 holds them exactly, and no wrap-around
        raise FedFactoryError(f"{where}: labels out of range: min {y.min()}, max {y.max()}")
    return y.astype(np.int64)


def resize_images(x: np.ndarray, size: int) -> np.ndarray:
    """Resize N x H x W x C uint8 images to size x size (bilinear, antialiased)."""
    if size <= 0 or x.shape[1:3] == (size, size):
        return x
    out = np.empty((len(x), size, size, x.shape[-1]), np.uint8)
    for i, img in enumerate(x):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        arr = np.asarray(pil.resize((size, size), Image.BILINEAR))
        out[i] = arr.reshape(size, size, -1)
    return out


def load_image_file(path, size: int, grey: bool) -> np.ndarray:
    """One image file -> uint8 size x size x C (C = 1 if grey)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = im.convert("L" if grey else "RGB")
                im = im.resize((size, size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
    except BAD_IMAGE as e:
        raise FedFactoryError(f"cannot read image {path}: {type(e).__name__}: {one_line(e)}") from None
    return arr.reshape(size, size, -1)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, seeded, stratified split: indices of train and test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
