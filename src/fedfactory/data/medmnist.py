"""MedMNIST: one .npz per subset and size (`bloodmnist.npz`, `bloodmnist_64.npz`, ...)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import FedFactoryError
from .base import Dataset
from .npz import from_arrays, read_npz

DEFAULT_ROOT = "~/.medmnist"
MULTI_LABEL = {"chestmnist"}
SIZES = (28, 64, 128, 224)
CLASS_NAMES = {
    "bloodmnist": ["basophil", "eosinophil", "erythroblast", "immature granulocytes",
                   "lymphocyte", "monocyte", "neutrophil", "platelet"],
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"],
    "retinamnist": [f"grade {i}" for i in range(5)],
    "dermamnist": ["actinic keratoses", "basal cell carcinoma", "benign keratosis", "dermatofibroma",
                   "melanoma", "melanocytic nevi", "vascular lesions"],
}
# Microscopy and dermoscopy have no canonical orientation: flips and 90-degree rotations.
DIHEDRAL = {"bloodmnist", "pathmnist", "dermamnist", "tissuemnist"}


def file_name(subset: str, size: int) -> str:
    return f"{subset}.npz" if size == 28 else f"{subset}_{size}.npz"


def parse(spec: str) -> tuple[str, int]:
    """'medmnist:bloodmnist' -> ('bloodmnist', 28); 'medmnist:pathmnist:64' -> ('pathmnist', 64)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise FedFactoryError(f"bad data set name {spec!r}: use medmnist:<subset>[:<size>], e.g. medmnist:bloodmnist:64")
    subset = parts[1].lower()
    try:
        size = int(parts[2]) if len(parts) == 3 else 28
    except ValueError:
        size = -1
    if size not in SIZES:
        raise FedFactoryError(f"{spec}: MedMNIST size must be one of {SIZES}")
    if subset in MULTI_LABEL or subset.endswith("3d"):
        raise FedFactoryError(f"{spec}: {subset} is multi-label or 3D; fedfactory needs single-label 2D classes")
    return subset, size


def download(subset: str, size: int, root: Path) -> None:
    import medmnist  # optional, only for the download

    info = medmnist.INFO.get(subset)
    if info is None:
        raise FedFactoryError(f"medmnist knows no subset {subset!r}; known: {sorted(medmnist.INFO)}")
    root.mkdir(parents=True, exist_ok=True)
    getattr(medmnist, info["python_class"])(split="train", download=True, root=str(root), size=size)


def load(spec: str, root: str = "", download_missing: bool = False, **_) -> Dataset:
    subset, size = parse(spec)
    folder = Path(root or DEFAULT_ROOT).expanduser()
    path = folder / file_name(subset, size)
    if not path.exists():
        has_pkg = importlib.util.find_spec("medmnist") is not None
        if download_missing and has_pkg:
            download(subset, size, folder)
        elif has_pkg:
            raise FedFactoryError(f"{path} not found: download it with --set data.download=true (needs the internet)")
        else:
            raise FedFactoryError(
                f"{path} not found: put {file_name(subset, size)} in {folder} (or set data.root), "
                "or `pip install medmnist` and use --set data.download=true"
            )
    ds = from_arrays(spec, read_npz(path), str(path), class_names=CLASS_NAMES.get(subset),
                     augment="dihedral" if subset in DIHEDRAL else "natural")
    ds.name = f"medmnist:{subset}:{size}"
    return ds
