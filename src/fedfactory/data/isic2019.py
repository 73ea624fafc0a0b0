"""ISIC 2019 as FLamby prepares it (Fed-ISIC2019): preprocessed JPEGs plus a `train_test_split`
CSV with columns image, target, center, fold. Its 6 centers are the natural partition."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..errors import FedFactoryError
from .base import Dataset, load_image_file, one_line

CLASS_NAMES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
IMAGE_DIRS = ("ISIC_2019_Training_Input_preprocessed", ".")


def load(root: str = "", size: int = 128, max_bytes: int = 8 << 30, **_) -> Dataset:
    if not root:
        raise FedFactoryError("isic2019: set data.root to the FLamby-prepared folder (with train_test_split)")
    folder = Path(root).expanduser()
    csv_path = next((p for p in (folder / "train_test_split", folder / "train_test_split.csv") if p.exists()), None)
    if csv_path is None:
        raise FedFactoryError(f"isic2019: {folder}/train_test_split not found (prepare the data with FLamby)")
    need = {"image", "target", "center", "fold"}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise FedFactoryError(f"isic2019: cannot read {csv_path}: {one_line(e)}") from None
    if not rows or not need <= set(rows[0]):
        raise FedFactoryError(f"isic2019: {csv_path} must have columns {sorted(need)}")
    size = size or 128
    if len(rows) * size * size * 3 > max_bytes:
        raise FedFactoryError(f"isic2019: {len(rows)} images of {size} x {size} would take "
                              f"{len(rows) * size * size * 3 / 2**30:.2f} GiB, above the cap of {max_bytes / 2**30:.2f} GiB")
    splits = {"train": ([], [], []), "test": ([], [], [])}
    for line, r in enumerate(rows, start=2):
        where = f"isic2019: {csv_path} row {line}"
        if any(not isinstance(r.get(k), str) for k in need):  # a short row leaves fields None
            raise FedFactoryError(f"{where}: missing fields (need {sorted(need)})")
        fold = r["fold"].strip()
        if fold not in splits:
            raise FedFactoryError(f"{where}: fold must be train or test, got {fold[:40]!r}")
        try:
            target, center = int(r["target"]), int(r["center"])
        except ValueError:
            raise FedFactoryError(f"{where}: target and center must be integers") from None
        if not 0 <= target < len(CLASS_NAMES) or not 0 <= center < 2**31:
            raise FedFactoryError(f"{where}: target must be in [0, {len(CLASS_NAMES)}) and center in [0, 2^31), "
                                  f"got {target}, {center}")
        name = r["image"].strip()
        if not name or name in (".", "..") or Path(name).name != name or "\x00" in name or len(name) > 200:
            raise FedFactoryError(f"{where}: image must be a file name without folders, got {name[:60]!r}")
        try:
            img = next((p for d in IMAGE_DIRS if (p := folder / d / f"{name}.jpg").is_file()), None)
        except OSError as e:
            raise FedFactoryError(f"{where}: cannot look up image {name[:60]!r}: {one_line(e)}") from None
        if img is None:
            raise FedFactoryError(f"isic2019: image {name + '.jpg'!r} not found under {folder}")
        xs, ys, cs = splits[fold]
        xs.append(load_image_file(img, size, grey=False))
        ys.append(target)
        cs.append(center)
    (xtr, ytr, ctr), (xte, yte, _) = splits["train"], splits["test"]
    if not xtr or not xte:
        raise FedFactoryError(f"isic2019: {csv_path} needs both train and test rows")
    return Dataset("isic2019", np.stack(xtr), np.asarray(ytr, np.int64), np.stack(xte), np.asarray(yte, np.int64),
                   CLASS_NAMES, augment="dihedral", groups_train=np.asarray(ctr, np.int64)).validate()
