"""ISIC 2019 as FLamby prepares it (Fed-ISIC2019): preprocessed JPEGs plus a `train_test_split`
CSV with columns image, target, center, fold. Its 6 centers are the natural partition."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..errors import FedFactoryError
from .base import Dataset, load_image_file

CLASS_NAMES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
IMAGE_DIRS = ("ISIC_2019_Training_Input_preprocessed", ".")


def load(root: str = "", size: int = 128, **_) -> Dataset:
    if not root:
        raise FedFactoryError("isic2019: set data.root to the FLamby-prepared folder (with train_test_split)")
    folder = Path(root).expanduser()
    csv_path = next((p for p in (folder / "train_test_split", folder / "train_test_split.csv") if p.exists()), None)
    if csv_path is None:
        raise FedFactoryError(f"isic2019: {folder}/train_test_split not found (prepare the data with FLamby)")
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise FedFactoryError(f"isic2019: cannot read {csv_path}: {e}") from None
    need = {"image", "target", "center", "fold"}
    if not rows or not need <= set(rows[0]):
        raise FedFactoryError(f"isic2019: {csv_path} must have columns {sorted(need)}")
    size = size or 128
    splits = {"train": ([], [], []), "test": ([], [], [])}
    for r in rows:
        fold = r["fold"].strip()
        if fold not in splits:
            raise FedFactoryError(f"isic2019: {csv_path}: fold must be train or test, got {fold!r}")
        img = next((folder / d / f"{r['image']}.jpg" for d in IMAGE_DIRS if (folder / d / f"{r['image']}.jpg").exists()), None)
        if img is None:
            raise FedFactoryError(f"isic2019: image {r['image']}.jpg not found under {folder}")
        xs, ys, cs = splits[fold]
        xs.append(load_image_file(img, size, grey=False))
        try:
            ys.append(int(r["target"]))
            cs.append(int(r["center"]))
        except ValueError:
            raise FedFactoryError(f"isic2019: {csv_path}: target and center must be integers ({r})") from None
    (xtr, ytr, ctr), (xte, yte, _) = splits["train"], splits["test"]
    if not xtr or not xte:
        raise FedFactoryError(f"isic2019: {csv_path} needs both train and test rows")
    return Dataset("isic2019", np.stack(xtr), np.asarray(ytr, np.int64), np.stack(xte), np.asarray(yte, np.int64),
                   CLASS_NAMES, augment="dihedral", groups_train=np.asarray(ctr, np.int64)).validate()
