"""The GPU path, checked where CI runs (no GPU): the prepared GPU check in its CPU form, the
determinism switches, loops that do not wait on the device, and configs that need no internet."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedfactory.classify.train import cross_entropy, train_classifier
from fedfactory.config import ClassifierConfig, load_config
from fedfactory.runtime import cuda_determinism
from helpers import ROOT, benchmark_script

gpu_check = benchmark_script("gpu_check")


def test_gpu_check_runs_every_section_in_its_cpu_form(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = {"fashion_x_train": rng.integers(0, 256, (200, 32, 32, 1), dtype=np.uint8), "fashion_y_train": np.arange(200) % 10,
            "fashion_x_test": rng.integers(0, 256, (40, 32, 32, 1), dtype=np.uint8), "fashion_y_test": np.arange(40) % 10,
            "br35h_x_train": rng.integers(0, 256, (20, 64, 64, 1), dtype=np.uint8), "br35h_y_train": np.arange(20) % 2,
            "br35h_x_test": rng.integers(0, 256, (6, 64, 64, 1), dtype=np.uint8), "br35h_y_test": np.arange(6) % 2}
    np.savez(tmp_path / "data.npz", **data)
    assert gpu_check.main(["run", "--data", str(tmp_path / "data.npz"), "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [s for s in gpu_check.SECTIONS if "error" in results[s]] == []
    assert all(results["determinism"][k] for k in ("module_weights_equal", "samples_equal", "classifier_weights_equal"))
    assert results["module_throughput"]["32px batch 8"]["images_per_s"] > 0
    e2e = results["end_to_end"]
    assert 0 <= e2e["factory_accuracy"] <= 1 and e2e["ratio"] == pytest.approx(
        e2e["factory_accuracy"] / e2e["centralized_accuracy"], abs=1e-3)
    assert "| determinism | samples_equal | True |" in capsys.readouterr().out


def test_gpu_check_without_its_data_says_how_to_make_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["run", "--data", str(tmp_path / "none.npz"), "--out", str(tmp_path)])
    assert "gpu_check.py pack" in capsys.readouterr().err


def test_cuda_determinism_sets_the_switches(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        cuda_determinism(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        cuda_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark


def test_cross_entropy_matches_torchs_values_and_gradients():
    torch.manual_seed(0)
    logits = torch.randn(64, 7, requires_grad=True)
    labels = torch.randint(0, 7, (64,))
    ours, theirs = cross_entropy(logits, labels), F.cross_entropy(logits, labels)
    assert torch.allclose(ours, theirs, atol=1e-6)
    g1, = torch.autograd.grad(ours, logits)
    g2, = torch.autograd.grad(theirs, logits)
    assert torch.allclose(g1, g2, atol=1e-7)


def test_classifier_training_reads_no_value_back_per_step(device_reads):
    rng = np.random.default_rng(0)
    cfg = ClassifierConfig(preset="cpu", width=8, budget_images=16 * 30, batch_size=16, optimizer="sgd", lr=0.05,
                           weight_decay=5e-4, blur=0.0)
    train_classifier(rng.integers(0, 256, (40, 12, 12, 1), dtype=np.uint8), np.arange(40) % 3, 3, cfg, 0, "t",
                     progress=False)
    assert len(device_reads) <= 1


def test_no_shipped_config_reaches_the_internet_and_each_points_to_the_protocol():
    for f in sorted((ROOT / "configs").glob("*-gpu.toml")):
        assert load_config(f).data.download is False, f.name
        assert "docs/PROTOCOL.md" in f.read_text(), f.name
    assert (ROOT / "docs" / "PROTOCOL.md").exists()
