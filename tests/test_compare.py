import json

import pytest

from fedfactory.cli import main
from helpers import toy_overrides

pytestmark = pytest.mark.slow


def test_compare_at_toy_size_writes_every_method_and_seed(digits_npz, tmp_path, capsys):
    methods = "factory,centralized,local-only,fedavg,fedprox,scaffold,feddyn"
    args = ["compare", "configs/fashion-silos.toml", "--methods", methods, "--seeds", "1,2", "--out", str(tmp_path / "cmp")]
    args += sum((["--set", o] for o in toy_overrides(digits_npz) + ["baselines.rounds=2", "classifier.budget_images=512"]), [])
    assert main(args) == 0
    summary = json.loads((tmp_path / "cmp/comparison.json").read_text())
    assert list(summary["methods"]) == methods.split(",")
    for name, m in summary["methods"].items():
        assert len(m["accuracy"]["runs"]) == 2 and 0 <= m["accuracy"]["mean"] <= 1, name
        assert m["accuracy"]["std"] >= 0
    assert summary["methods"]["fedavg"]["rounds"] == 2 and summary["methods"]["factory"]["rounds"] == 1
    assert summary["methods"]["scaffold"]["uploaded_bytes"] > summary["methods"]["fedavg"]["uploaded_bytes"]
    table = (tmp_path / "cmp/comparison.md").read_text()
    assert all(f"| {m} |" in table for m in methods.split(","))
    assert (tmp_path / "cmp/comparison.png").stat().st_size > 0
    curve = json.loads((tmp_path / "cmp/fedavg/seed-1/results.json").read_text())["details"]["learning_curve"]
    assert [p["round"] for p in curve] == [1, 2]
    assert [p["round"] for p in summary["methods"]["scaffold"]["learning_curve"]] == [1, 2]
    assert "learning_curve" not in summary["methods"]["factory"]
    assert (tmp_path / "cmp/learning_curves.png").stat().st_size > 0
    # finished pairs are skipped: a re-run touches no results file
    stamp = (tmp_path / "cmp/fedavg/seed-1/results.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (tmp_path / "cmp/fedavg/seed-1/results.json").stat().st_mtime_ns == stamp


def test_the_centralized_bound_trains_with_the_real_data_recipe(digits_npz, monkeypatch):
    """`centralized` drops the blur meant for synthetic images and takes its own budget; the
    same-recipe column keeps the factory's classifier section as it is."""
    from fedfactory import baselines
    from fedfactory.config import load_config
    from fedfactory.runners.common import prepare_data

    cfg = load_config(None, [*toy_overrides(digits_npz), "classifier.blur=1.5", "classifier.budget_images=256",
                             "baselines.central_budget=384"])
    ds, part = prepare_data(cfg)
    seen = {}
    real_training = baselines.train_classifier

    def recording(images, labels, num_classes, recipe, seed, name, **kw):
        seen[name] = recipe
        return real_training(images, labels, num_classes, recipe, seed, name, **kw)

    monkeypatch.setattr(baselines, "train_classifier", recording)
    for method in ("centralized", "centralized-same-recipe"):
        log_proba, info = baselines.run_baseline(method, cfg, ds, part)
        assert log_proba.shape == (len(ds.y_test), ds.num_classes)
    assert (seen["centralized"].blur, seen["centralized"].budget_images) == (0.0, 384)
    assert seen["centralized-same-recipe"] == cfg.classifier
    assert info["classifier"]["images_seen"] == 256
