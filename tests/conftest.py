import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from helpers import digits_file, write_image_folder

# Fixtures shared by several test files; plain helpers are in helpers.py. Test files import neither
# this file nor each other.

# The toy Flower federation: three sites of the digits 0-2.
FLOWER_TOY = """seed = 0
[data]
name = "npz:{npz}"
[partition]
scheme = "silos"
clients = 3
[module]
channels = 8
channel_mult = [1, 2]
num_blocks = 1
budget_images = 128
batch_size = 32
sample_steps = 2
[factory]
per_class = 20
[classifier]
budget_images = 256
batch_size = 64
width = 8
[quality]
reference_budget = 256
[runtime]
threads = 1
progress = false
"""

# The consortium of the hospitals fixture: a data set that does not exist, the sites hold the images.
CONSORTIUM_TOY = """seed = 0
data = {{name = "npz:{npz}", classes = ["zero", "one", "two", "three"], size = 8, channels = 1}}
partition = {{scheme = "silos", clients = 2}}
module = {{channels = 8, channel_mult = [1, 2], num_blocks = 1, budget_images = 1024, batch_size = 32, sample_steps = 3}}
factory = {{per_class = 30}}
classifier = {{budget_images = 1024, batch_size = 64, width = 8}}
quality = {{reference_budget = 0}}
runtime = {{threads = 1, parallel_clients = 1, progress = false}}
"""


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">i", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def toy_images():
    """Three classes of 12 x 12 grey images with different, learnable shapes."""
    rng = np.random.default_rng(0)
    x = np.zeros((60, 12, 12, 1), np.uint8)
    y = np.repeat(np.arange(3), 20)
    for i, c in enumerate(y):
        x[i, 2 + c * 3 : 5 + c * 3, 2:10, 0] = 200 + rng.integers(0, 50)
    return x, y


@pytest.fixture
def device_reads(monkeypatch):
    """A list that grows by one each time fedfactory's own code reads a tensor's value back to the host
    (`.item()`, `.tolist()`, `float()`, `int()`, `bool()`): on a GPU, each read waits for all queued work.

    A read is fedfactory's when the function that makes it is defined in a `fedfactory` module, told by
    the module's name, never by its file's path: a path is fedfactory's and torch's alike when the
    checkout or the virtual environment lies in a folder named fedfactory, and then torch's own reads
    counted (Adam's per-parameter `step.item()` on the CPU, 107 per step for the test U-Net)."""
    import sys

    import torch

    calls = []

    def counting(name):
        read = getattr(torch.Tensor, name)

        def counted(t, *args, **kwargs):
            module = sys._getframe(1).f_globals.get("__name__") or ""
            if module == "fedfactory" or module.startswith("fedfactory."):
                calls.append(name)
            return read(t, *args, **kwargs)

        return counted

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    return calls


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory):
    """The toy pipeline's data set: sklearn's digits 0-3 (8 x 8 px) as an .npz (toy_overrides runs on it)."""
    return digits_file(tmp_path_factory.mktemp("data") / "digits.npz", classes=4)


@pytest.fixture(scope="module")
def toy_config(tmp_path_factory):
    """A run config for the toy Flower federation, on the digits 0-2."""
    folder = tmp_path_factory.mktemp("flower")
    path = folder / "toy.toml"
    path.write_text(FLOWER_TOY.format(npz=digits_file(folder / "digits.npz", classes=3)))
    return path


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory):
    """Two hospitals' training and test folders (digits, two classes each), and a consortium config whose
    data set does not exist: a coordinator that read any image would fail."""
    from fedfactory.config import load_config
    from fedfactory.runners.embedded import prepare_data
    from fedfactory.server import evaluation_split

    root = tmp_path_factory.mktemp("hospitals")
    names = ["zero", "one", "two", "three"]
    cfg = load_config(None, [f"data.name='npz:{digits_file(root / 'public.npz', classes=4)}'", "partition.clients=2"])
    ds, part = prepare_data(cfg)
    test = evaluation_split(cfg, ds)
    for cid, idx in sorted(part.indices.items()):
        write_image_folder(root / "sites" / cid, ds.x_train[idx], ds.y_train[idx], names)
        own = np.isin(test.labels, np.unique(ds.y_train[idx]))  # each hospital tests on its own classes
        write_image_folder(root / "tests" / cid, test.images[own], test.labels[own], names)
    config = root / "consortium.toml"
    config.write_text(CONSORTIUM_TOY.format(npz=root / "nowhere.npz"))
    return root, config, test


@pytest.fixture
def in_a_run(monkeypatch):
    """Flower builds a Message only inside a run (the ServerApp's process knows its run id): for the
    tests that build Messages in this process (`pytestmark = pytest.mark.usefixtures("in_a_run")`)."""
    from flwr.supercore.task_identity import TaskIdentity

    for identity in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, identity, 1)


@pytest.fixture
def fashion_idx_dir(tmp_path):
    """A miniature Fashion-MNIST folder in the original IDX .gz format."""
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 50), ("t10k", 20)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip (a missing package, data set or CLI) is a failure: CI installs everything."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI", "").lower() == "true" and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped under CI=true, which must install everything: {reason}"
