"""The federation's classifier as one self-describing file: what goes back to every site.

    model = FederatedClassifier(nets, class_names, image_shape, mode, missing_classes, preset, width)
    blob = model.to_bytes()                          # safetensors: weights + one JSON metadata key
    model = FederatedClassifier.from_bytes(blob)     # checked before anything is built
    labels = model.predict(images)                   # uint8 N x H x W x C in, class ids out
    proba = model.predict_proba(["a.png", "b.dcm"])  # or image files, read and resized as the sites' loaders

A file holds one network (server mode) or the sites' experts (local mode, combined as a Product of
Experts), the class names, the image shape, the preprocessing and the classes that no module
covered (never predicted). Loading builds nothing that the metadata does not describe within
bounds, and never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .. import __version__
from ..data.folder import load_files
from ..errors import FedFactoryError
from ..modules.fileformat import check_client_id
from .registry import classifier_networks
from .train import build_classifier, predict_log_proba, product_of_experts

FORMAT = "fedfactory-classifier"
FORMAT_VERSION = 1
PREPROCESSING = {"pixels": "uint8 N x H x W x C", "resize": "bilinear to image_shape (as the sites' loaders)",
                 "model_range": [-1.0, 1.0], "x_model": "x / 127.5 - 1"}
# What a file from a peer may declare, checked before a network is built.
MAX_NETS, MAX_CLASSES, MAX_SIDE, MAX_WIDTH, MAX_BYTES, MAX_HEADER = 256, 10_000, 4096, 1024, 1 << 30, 1 << 26


@dataclass
class FederatedClassifier:
    nets: dict[str, torch.nn.Module]           # "server", or one expert per client id (local mode)
    class_names: list[str]
    image_shape: tuple[int, int, int]  # H, W, C
    mode: str = "server"               # server | local (Product of Experts)
    missing_classes: list[int] = field(default_factory=list)  # never predicted: no module covered them
    preset: str = "cpu"
    width: int = 0
    file_sha256: str = ""  # of the bytes it was read from

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def classes_(self) -> np.ndarray:
        """scikit-learn's name: what predict returns (class ids; class_names[i] names id i)."""
        return np.arange(self.num_classes)

    def predict_log_proba(self, images, device="cpu", bf16: bool = False) -> np.ndarray:
        """Log-probabilities per class (float64): one network's, or the experts' product; classes no
        module covered get -inf. images: uint8 N x H x W x C, or image file paths (one or a list)."""
        images = self._as_images(images)
        self._check_images(images)
        probas = [predict_log_proba(net, images, device, bf16) for net in self.nets.values()]
        log_proba = probas[0] if self.mode == "server" else product_of_experts(probas)
        if self.missing_classes:
            log_proba[:, self.missing_classes] = -np.inf
            log_proba -= np.logaddexp.reduce(log_proba, axis=1, keepdims=True)
        return log_proba

    def predict_proba(self, images, device="cpu", bf16: bool = False) -> np.ndarray:
        return np.exp(self.predict_log_proba(images, device, bf16))

    def predict(self, images, device="cpu", bf16: bool = False) -> np.ndarray:
        return self.predict_log_proba(images, device, bf16).argmax(1)

    def _as_images(self, images) -> np.ndarray:
        """Arrays as they are; file paths read as a site's loader reads its folder (data/folder.py)."""
        paths = [images] if isinstance(images, (str, os.PathLike)) else images
        if isinstance(paths, np.ndarray) or not all(isinstance(f, (str, os.PathLike)) for f in paths):
            return np.asarray(images)
        h, w, c = self.image_shape
        if h != w:
            raise FedFactoryError(f"the classifier takes {h} x {w} images; files are resized to squares: pass arrays")
        return load_files(paths, h, c)

    def _check_images(self, images: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != tuple(self.image_shape):
            raise FedFactoryError(f"the classifier takes uint8 N x {' x '.join(map(str, self.image_shape))} images, "
                                  f"got {images.dtype} {tuple(images.shape)}")

    # -- the file -------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
                "mode": self.mode, "networks": list(self.nets), "architecture": classifier_networks()[self.preset][1],
                "preset": self.preset,
                "width": self.width, "class_names": list(self.class_names), "image_shape": list(self.image_shape),
                "missing_classes": list(self.missing_classes), "preprocessing": PREPROCESSING,
                "combine": "one network" if self.mode == "server" else
                           "Product of Experts: sum of the experts' log-softmax, renormalised"}

    def to_bytes(self) -> bytes:
        """Reproducible bytes: tensors named NETWORK/PARAMETER, the description in one metadata key
        (safetensors writes several keys in no fixed order)."""
        tensors = {f"{name}/{k}": v.detach().cpu().contiguous()
                   for name, net in self.nets.items() for k, v in net.state_dict().items()}
        return save_safetensors(tensors, metadata={FORMAT: json.dumps(self.describe(), sort_keys=True)})

    @classmethod
    def from_bytes(cls, blob: bytes, where: str = "classifier") -> "FederatedClassifier":
        if len(blob) > MAX_BYTES:
            raise FedFactoryError(f"{where}: {len(blob):,} bytes, over the cap of {MAX_BYTES:,}")
        d = _description(blob, where)
        try:
            state = load_safetensors(blob)
            nets = {}
            for name in d["networks"]:
                net = build_classifier(d["image_shape"][2], len(d["class_names"]), d["preset"], d["width"])
                net.load_state_dict({k.split("/", 1)[1]: v for k, v in state.items() if k.split("/", 1)[0] == name})
                nets[name] = net.eval()
            if sum(len(n.state_dict()) for n in nets.values()) != len(state):
                raise ValueError("the file holds tensors of no declared network")
        except (SafetensorError, ValueError, RuntimeError, KeyError, IndexError) as e:
            raise FedFactoryError(f"{where}: the weights do not match the description: {str(e).splitlines()[0][:200]}") from None
        return cls(nets, d["class_names"], tuple(d["image_shape"]), d["mode"], d["missing_classes"], d["preset"],
                   d["width"], hashlib.sha256(blob).hexdigest())


def select_experts(experts: dict, client_ids: list[str], missing_experts: str = "error") -> dict:
    """Local mode: the experts (client id -> (network, stats)) that the Product of Experts combines, by
    client id. A site in `client_ids` that sent none fails the run, or, with missing_experts "drop", is
    left out; with no expert at all there is no classifier."""
    missing = [cid for cid in client_ids if cid not in experts]
    if missing and missing_experts == "error":
        raise FedFactoryError(f"local mode: no expert from {', '.join(missing)}; set classifier.missing_experts="
                              '"drop" to combine the others')
    if not set(experts) - set(missing):
        raise FedFactoryError("local mode: no site sent an expert classifier")
    return {cid: experts[cid] for cid in sorted(experts)}


def _description(blob: bytes, where: str) -> dict:
    """The metadata of a classifier file, every field checked against its bounds."""
    try:
        n = int.from_bytes(blob[:8], "little")
        if len(blob) < 8 or n > min(len(blob) - 8, MAX_HEADER):
            raise ValueError("truncated or oversized header")
        d = json.loads(json.loads(blob[8: 8 + n])["__metadata__"][FORMAT])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise FedFactoryError(f"{where}: not a fedfactory classifier file (no {FORMAT!r} description)") from None

    def bad(why: str):
        return FedFactoryError(f"{where}: {why}")

    if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
        raise bad(f"unknown format {str(d.get('format') if isinstance(d, dict) else d)[:40]!r} "
                  f"version {d.get('format_version') if isinstance(d, dict) else None!r}")
    names, classes, shape = d.get("networks"), d.get("class_names"), d.get("image_shape")
    if d.get("mode") not in ("server", "local") or d.get("preset") not in classifier_networks():
        raise bad(f"mode must be server or local, preset one of {', '.join(classifier_networks())} (a network "
                  f"registered here), got {str(d.get('mode'))[:20]!r}, {str(d.get('preset'))[:40]!r}")
    if not isinstance(names, list) or not 1 <= len(names) <= MAX_NETS or len(set(map(str, names))) != len(names):
        raise bad(f"networks must be 1 to {MAX_NETS} distinct names")
    for name in names:
        if name != "server":
            check_client_id(name)
    if not isinstance(classes, list) or not 2 <= len(classes) <= MAX_CLASSES or \
            not all(isinstance(c, str) for c in classes):
        raise bad(f"class_names must be 2 to {MAX_CLASSES} names")
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(s) is int for s in shape)
            and 1 <= shape[0] <= MAX_SIDE and 1 <= shape[1] <= MAX_SIDE and shape[2] in (1, 3)):
        raise bad(f"image_shape must be [H, W, 1 or 3] within {MAX_SIDE} px")
    if type(d.get("width")) is not int or not 0 <= d["width"] <= MAX_WIDTH:
        raise bad(f"width must be an integer in [0, {MAX_WIDTH}]")
    missing = d.get("missing_classes")
    if not isinstance(missing, list) or not all(type(c) is int and 0 <= c < len(classes) for c in missing):
        raise bad("missing_classes must be class ids")
    return d


def load_classifier_file(path) -> FederatedClassifier:
    """A classifier file (a run's model.safetensors, or the copy a site keeps), checked: predict,
    predict_proba and predict_log_proba take uint8 N x H x W x C arrays or image file paths; class_names,
    image_shape, mode and missing_classes describe it."""
    try:
        size = os.stat(path).st_size
        if size > MAX_BYTES:
            raise FedFactoryError(f"{path}: {size:,} bytes, over the cap of {MAX_BYTES:,}")
        blob = open(path, "rb").read()
    except OSError as e:
        raise FedFactoryError(f"cannot read classifier {path}: {e.strerror or e}") from None
    return FederatedClassifier.from_bytes(blob, str(path))

