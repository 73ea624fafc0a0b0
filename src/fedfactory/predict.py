"""The federation's classifier in use at a site: a class and a probability per class for every image.

    model = load_classifier_file("runs/x/model.safetensors")
    summary = predict_to_csv(model, "/data/new-scans", "predictions.csv")   # {"images", "labelled", "accuracy"}

Images come as the sites' loaders read them (data/folder.py), resized bilinearly to the classifier's
size and made grey or colour as it was trained: a folder (one subfolder per class, named as the
classifier's classes, or image and DICOM files at any depth, unlabelled), one image file, a CSV
(`path` or `path,label`) or an .npz (its test images, `x_test`/`test_images`/`images`, with labels
if it holds them). Files are read in chunks, so an archive of any size needs memory for one chunk.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from .classify.model import FederatedClassifier
from .data.folder import DICOM_EXTENSIONS, IMAGE_EXTENSIONS, image_files, labelled_files, load_files, load_npz_images
from .errors import FedFactoryError
from .tensors import resolve_device, use_bf16
from .utils import atomic_write_text

CHUNK = 500  # images read and predicted at a time: predict_log_proba's own batch


@dataclass
class Inputs:
    names: list[str]                  # one per image: its file, or FILE#INDEX for an array
    labels: np.ndarray | None         # global class ids, when the source says them
    read: Callable[[int, int], np.ndarray]  # images [i, j) as uint8 N x H x W x C


def open_inputs(source: str | Path, model: FederatedClassifier) -> Inputs:
    """What to predict on, and how to read it, for a folder, an image file, a CSV or an .npz."""
    h, w, c = model.image_shape
    p = Path(source).expanduser()
    if p.suffix.lower() == ".npz" and p.is_file():
        x, y = load_npz_images(p, model.class_names, h, c)
        _check_square(model, x.shape[1:3] != (h, w))
        return Inputs([f"{p}#{i}" for i in range(len(x))], y, lambda i, j: x[i:j])
    _check_square(model, h != w)
    if p.is_dir():
        subs = [d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")]
        class_folders = subs and all(d.name in model.class_names for d in subs) and not any(
            f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS + DICOM_EXTENSIONS for f in p.iterdir())
        items = labelled_files(p, model.class_names) if class_folders else [(f, -1) for f in image_files(p)]
    elif p.is_file() and p.suffix.lower() == ".csv":
        items = labelled_files(p, model.class_names)
    elif p.is_file():
        items = [(p, -1)]
    else:
        raise FedFactoryError(f"{p} does not exist: give a folder, an image file, a CSV or an .npz")
    if not items:
        raise FedFactoryError(f"{p} holds no images ({', '.join(IMAGE_EXTENSIONS)} or DICOM)")
    files, ids = [f for f, _ in items], np.array([gid for _, gid in items], np.int64)
    return Inputs([str(f) for f in files], ids if (ids >= 0).all() else None,
                  lambda i, j: load_files(files[i:j], h, c, f"{p}"))


def _check_square(model: FederatedClassifier, bad: bool) -> None:
    if bad:
        raise FedFactoryError(f"the classifier takes {' x '.join(map(str, model.image_shape[:2]))} images; "
                              "files and arrays are resized to squares")


def predict_inputs(model: FederatedClassifier, inputs: Inputs, device="auto", bf16="auto",
                   progress: bool = True) -> np.ndarray:
    """Log-probabilities (N x K float64) for every input, chunk by chunk; device and bf16 as runtime's
    settings ("auto": the run's own defaults, so a run's test images get the run's answers)."""
    device = resolve_device(device)
    bf16 = use_bf16(device, bf16) if isinstance(bf16, str) else bf16
    n, out = len(inputs.names), []
    with tqdm(total=n, desc="predict", unit="img", disable=None if progress else True, delay=1,
              leave=False, dynamic_ncols=True) as bar:
        for i in range(0, n, CHUNK):
            out.append(model.predict_log_proba(inputs.read(i, min(n, i + CHUNK)), device, bf16))
            bar.update(len(out[-1]))
    return np.concatenate(out)


def predictions_csv(names: list[str], log_proba: np.ndarray, class_names: list[str]) -> str:
    """path, predicted class name, then p_<class> per class."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "predicted", *(f"p_{c}" for c in class_names)])
    for name, lp in zip(names, log_proba):
        w.writerow([name, class_names[int(lp.argmax())], *(f"{p:.6g}" for p in np.exp(lp))])
    return buf.getvalue()


def predict_to_csv(model: FederatedClassifier, source: str | Path, out: str | Path, device="auto", bf16="auto",
                   progress: bool = True) -> dict:
    """Predict every image of source, write the CSV, and return what it found: the number of images and,
    for a labelled source, the accuracy (correct / images, as results.json counts it)."""
    inputs = open_inputs(source, model)
    log_proba = predict_inputs(model, inputs, device, bf16, progress)
    atomic_write_text(Path(out), predictions_csv(inputs.names, log_proba, model.class_names))
    summary = {"images": len(inputs.names), "labelled": inputs.labels is not None, "accuracy": None, "correct": None}
    if inputs.labels is not None:
        correct = int((log_proba.argmax(1) == inputs.labels).sum())
        summary.update(correct=correct, accuracy=correct / len(inputs.labels))
    return summary
