"""Plain helpers shared by the tests: data on disk, tiny configs and modules, checks, and the loader
of the benchmark scripts that tests run. Fixtures live in conftest.py; the fuzz generators in fuzzing.py.

Test files import this module as `helpers` (pytest puts tests/ on the path). conftest.py imports it
too, so its top-level imports stay light: what pulls in torch or sklearn is imported where it is used.
"""

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fedfactory.config import ClassifierConfig

ROOT = Path(__file__).resolve().parents[1]

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed: sudo apt-get install dataset-fashion-mnist",
)


def benchmark_script(name: str):
    """benchmarks/<name>.py loaded as a module, for the tests of that script itself (its main, its
    argument checks): a benchmark is a script, not a package, and tests import no helper from one."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the toy pipeline: sklearn digits (the digits_npz fixture), tiny budgets ---------------------------

def digits_file(path: Path, classes: int) -> Path:
    """sklearn's digits of the classes below `classes` (8 x 8 px, 0-255) as an .npz at `path`: the
    even rows train, the odd rows test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.images * 255 / 16).astype(np.uint8), d.target
    keep = y < classes
    np.savez(path, x_train=x[keep][::2], y_train=y[keep][::2], x_test=x[keep][1::2], y_test=y[keep][1::2])
    return path


def toy_overrides(npz, mode="server", scheme="silos", clients=4):
    return [f"data.name='npz:{npz}'", f"partition.scheme='{scheme}'", f"partition.clients={clients}",
            "module.channels=8", "module.channel_mult=[1, 2]", "module.num_blocks=1",
            "module.budget_images=2048", "module.batch_size=32", "module.sample_steps=3",
            "factory.per_class=40", "classifier.budget_images=2048", "classifier.batch_size=64",
            "classifier.width=8", "quality.reference_budget=1024", f"classifier.mode='{mode}'", "runtime.progress=false", "runtime.parallel_clients=1"]


TINY_ARCH = {"channels": 8, "channel_mult": [1, 2], "num_blocks": 1}
TINY_TRAIN = {"budget_images": 64, "batch_size": 16, "sample_steps": 3}


def tiny(kind="diffusion", seed=0, client="client-0"):
    """An untrained module of the smallest size, diffusion or cVAE."""
    from fedfactory.modules.cvae import CVAEModule
    from fedfactory.modules.diffusion import DiffusionModule

    if kind == "diffusion":
        return DiffusionModule(TINY_ARCH, TINY_TRAIN, client_id=client, seed=seed, progress=False)
    return CVAEModule({"channels": 8, "latent": 4}, {"budget_images": 64, "batch_size": 16}, client_id=client,
                      seed=seed, progress=False)


# a classifier recipe that trains in a blink (12 steps)
TINY_CLASSIFIER = ClassifierConfig(preset="cpu", width=8, budget_images=16 * 12, batch_size=16, optimizer="sgd",
                                   lr=0.05, weight_decay=5e-4, blur=0.0)


# -- image folders, as a site would hold them --------------------------------------------------------

def write_image_folder(folder, images, labels, class_names):
    """The ImageFolder layout a hospital would have: one folder per class, PNG files named in order."""
    for i, (img, y) in enumerate(zip(images, labels)):
        d = folder / class_names[y]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(d / f"{i:05d}.png")


# single images for the folder readers (test_site_data.py, test_dicom.py)
CLASSES = ["cat", "dog", "fox"]


def grey(seed, h=8, w=8):
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def colour(seed, h=8, w=8):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


BR35H = """seed = 0
[data]
name = "br35h"
size = 16
train_per_class = 48
test_per_class = 40
classes = ["no tumour", "tumour"]
[partition]
scheme = "silos"
clients = 2
[module]
channels = 8
channel_mult = [1, 2]
num_blocks = 1
budget_images = 512
batch_size = 32
sample_steps = 3
[factory]
per_class = 40
[classifier]
budget_images = 1024
batch_size = 64
width = 8
[quality]
reference_budget = 512
[runtime]
threads = 1
parallel_clients = 1
progress = false
"""


# -- the site in control: the policy and the pooled evaluation ----------------------------------------

EXACT = ("accuracy", "balanced_accuracy", "f1", "precision", "recall", "per_class_accuracy", "confusion_matrix")

# A hospital's policy: no expert leaves it, at most 10 passes over its images, its audit always on.
STRICT = """may_set = ["*"]
max_passes = 10
require_audit = true
allow_expert = false
keep_dir = "{keep}"
"""


def union_metrics(model_file, test) -> dict:
    """The metrics of the model file on the whole test set, evaluated in one place."""
    from fedfactory.classify.model import load_classifier_file
    from fedfactory.evaluate import evaluate
    from fedfactory.tensors import resolve_device, use_bf16

    model = load_classifier_file(model_file)
    device = resolve_device("auto")
    return evaluate(test.labels, model.predict_log_proba(test.images, device, use_bf16(device, "auto")), 4)


def assert_pooled_equals_union(results: dict, union: dict) -> None:
    """The metrics pooled from the sites' counts are the union's, exactly (AUROC within a bin)."""
    assert results["evaluation"]["by"] == "sites"
    assert {k: results["metrics"][k] for k in EXACT} == {k: union[k] for k in EXACT}
    assert abs(results["metrics"]["auroc"] - union["auroc"]) < 0.002
    assert sorted(results["evaluation"]["sites"]) == ["client-0", "client-1"]
    assert sum(s["images"] for s in results["evaluation"]["sites"].values()) == results["test"]["images"]


# -- Flower ---------------------------------------------------------------------------------------------

class FakeGrid:
    """Replies, by node id, to whatever the server pushes; they arrive in node id order."""

    def __init__(self, replies: dict):
        self.replies, self.sent = replies, {}

    def push_messages(self, messages):
        ids = []
        for m in messages:
            ids.append(f"msg-{m.metadata.dst_node_id}")
            self.sent[m.metadata.dst_node_id] = m
        return ids

    def pull_messages(self, ids):
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid), has_error=lambda: False,
                                content=self.replies[int(mid.split("-")[1])])
                for mid in sorted(ids, key=lambda mid: int(mid.split("-")[1]))]


def assert_same_run(flower_dir, embedded_dir, embedded: dict) -> None:
    """A Flower run equals the embedded one: metrics, synthetic set, and every module byte for byte."""
    flower = json.loads((flower_dir / "results.json").read_text())
    assert flower["metrics"] == embedded["metrics"]
    assert flower["synthetic"]["sha256"] == embedded["synthetic"]["sha256"]
    for cid in ("client-0", "client-1", "client-2"):
        assert (flower_dir / "modules" / cid / "module.safetensors").read_bytes() == \
            (embedded_dir / "modules" / cid / "module.safetensors").read_bytes()
