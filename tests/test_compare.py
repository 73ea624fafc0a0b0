import json
import math

import pytest

from fedfactory.cli import main
from fedfactory.report import read_curves
from fedfactory.runners.compare import _write_latex
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
    # every method/seed folder has its training curves, with the series each method trains
    expected = {"factory": {*(f"module/client-{i}" for i in range(4)), "classifier/server"},
                "centralized": {"classifier/centralized"}, "local-only": {f"site/client-{i}" for i in range(4)},
                **{m: {f"{m}/rounds"} for m in ("fedavg", "fedprox", "scaffold", "feddyn")}}
    for name, series in expected.items():
        curves = read_curves(tmp_path / f"cmp/{name}/seed-2/curves.csv")
        assert {r["series"] for r in curves} == series, name
        assert all(math.isfinite(r["loss"]) for r in curves), name
    assert [r["step"] for r in read_curves(tmp_path / "cmp/fedavg/seed-1/curves.csv")] == [1, 2]
    details = {m: json.loads((tmp_path / f"cmp/{m}/seed-1/results.json").read_text())["details"]
               for m in ("local-only", "centralized")}
    assert "curves" not in details["local-only"] and "curve" not in details["centralized"]["classifier"]
    tex = (tmp_path / "cmp/comparison.tex").read_text()
    assert tex.count(r" \\") == 1 + len(methods.split(",")) and "\\mathbf{" in tex and "\\bottomrule" in tex
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


def test_the_latex_table_has_a_row_per_method_and_the_best_mean_in_bold(tmp_path):
    def method(acc, auroc):
        m = {k: {"mean": acc, "std": 0.01, "runs": [acc]} for k in ("accuracy", "balanced_accuracy", "f1")}
        return {**m, "auroc": {"mean": auroc, "std": 0.002, "runs": [auroc]}, "rounds": 1, "uploaded_bytes": 2_500_000,
                "downloaded_bytes": 0, "wall_seconds": 61.7}

    summary = {"config": {"data": {"name": "digits"}, "partition": {"scheme": "silos", "clients": 4}}, "seeds": [1, 2],
               "methods": {"factory": method(0.81234, 0.95), "fed_avg & co": method(0.7, 0.97)}}
    _write_latex(tmp_path, summary)
    rows = [l for l in (tmp_path / "comparison.tex").read_text().splitlines() if l.endswith(r"\\")][1:]
    assert rows[0] == (r"factory & $\mathbf{0.8123 \pm 0.0100}$ & $\mathbf{0.8123 \pm 0.0100}$ & $0.9500 \pm 0.0020$ & "
                       r"$\mathbf{0.8123 \pm 0.0100}$ & 1 & 62 & 2 MB & 0 B \\")
    assert rows[1].startswith(r"fed\_avg \& co & $0.7000 \pm 0.0100$") and r"$\mathbf{0.9700 \pm 0.0020}$" in rows[1]
