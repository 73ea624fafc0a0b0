import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed: sudo apt-get install dataset-fashion-mnist",
)


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
