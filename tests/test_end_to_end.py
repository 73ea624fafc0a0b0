"""The real pipeline at toy size: sklearn digits (8 x 8 px) as an .npz, tiny budgets."""

import json

import numpy as np
import pytest

from fedfactory.cli import main
from fedfactory.config import load_config
from fedfactory.factory import synthesize
from fedfactory.modules import load_module
from fedfactory.report import read_curves
from fedfactory.runners.embedded import run
from helpers import toy_overrides

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["server", "local"])
def test_pipeline_writes_sane_results(digits_npz, tmp_path, mode):
    out = tmp_path / "run"
    # server mode: the reference gets the classifier's budget, so it is the centralized bound of the same run
    sets = toy_overrides(digits_npz, mode) + (["quality.reference_budget=2048"] if mode == "server" else [])
    rc = main(["run", "configs/fashion-silos.toml", "--out", str(out), *sum((["--set", o] for o in sets), [])])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    for k in ("accuracy", "balanced_accuracy", "auroc", "f1", "precision", "recall"):
        assert 0.0 <= res["metrics"][k] <= 1.0
    assert res["metrics"]["accuracy"] > 0.25  # above chance for 4 classes, even at toy size
    assert res["synthetic"]["per_class"] == [40, 40, 40, 40]
    assert set(res["timings"]) >= {"data", "modules", "synthesis", "classifier"}
    assert [m["client"] for m in res["modules"]] == ["client-0", "client-1", "client-2", "client-3"]
    assert res["clients"]["client-2"][2] > 0 and sum(res["clients"]["client-2"]) == res["clients"]["client-2"][2]
    assert len(np.array(res["metrics"]["confusion_matrix"])) == 4
    for f in ("report.md", "samples.png", "confusion.png", "config.toml", "registry.json", "audit.jsonl"):
        assert (out / f).stat().st_size > 0
    assert "| accuracy |" in (out / "report.md").read_text()
    # every module's quality, measured in a reference classifier's features against the real test images
    q = res["quality"]
    assert 0 <= q["reference"]["test_accuracy"] <= 1
    assert q["reference"]["centralized"] is (mode == "server")
    assert ("x** of it" in (out / "report.md").read_text()) is (mode == "server")
    assert ("the experts have no audit and no DP" in (out / "report.md").read_text()) is (mode == "local")

    assert {c: list(per) for c, per in q["modules"].items()} == {f"client-{i}": [str(i)] for i in range(4)}
    for per in q["modules"].values():
        m = per[next(iter(per))]
        assert m["fid"] >= 0 and 0 <= m["precision"] <= 1 and 0 <= m["coverage"] <= 1 and m["synthetic"] == 40
    assert "## Module quality" in (out / "report.md").read_text() and (out / "classifiers/reference.safetensors").exists()
    for m in res["modules"]:
        assert load_module(out / "modules" / m["client"]).saved_manifest["weights_sha256"] == m["sha256"]
    # the training curves: every module's and the classifier's, in curves.csv, not in results.json
    curves = read_curves(out / "curves.csv")
    classifiers = ["server"] if mode == "server" else [f"client-{i}" for i in range(4)]
    assert sorted({r["series"] for r in curves}) == [*(f"classifier/{c}" for c in classifiers),
                                                      *(f"module/client-{i}" for i in range(4))]
    assert all(np.isfinite(r["loss"]) and r["step"] > 0 for r in curves)
    assert len([r for r in curves if r["series"] == "module/client-0"]) == 2048 // 32  # 64 steps, a point each
    assert all("curve" not in s for s in res["classifier"].values())
    assert (out / "module_curves.png").stat().st_size > 0 and "(module_curves.png)" in (out / "report.md").read_text()


def test_resume_reuses_verified_modules_and_refuses_to_overwrite(digits_npz, tmp_path):
    cfg = load_config("configs/fashion-silos.toml", toy_overrides(digits_npz))
    out = tmp_path / "run"
    first = run(cfg, out)
    curves = read_curves(out / "curves.csv")
    with pytest.raises(Exception, match="already holds a run"):
        run(cfg, out)
    # a damaged module is retrained, the others are reused
    w = out / "modules" / "client-1" / "module.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    second = run(cfg, out, resume=True)
    adds = [json.loads(l) for l in (out / "audit.jsonl").read_text().splitlines()]
    assert [a["client"] for a in adds if a["event"] == "add"][4:] == ["client-1"]
    assert second["metrics"] == first["metrics"]
    assert [m["sha256"] for m in second["modules"]] == [m["sha256"] for m in first["modules"]]
    # the reused modules keep their curves, the retrained one has its new one (the same: the same seed)
    assert read_curves(out / "curves.csv") == curves
    # another sampler (the config's is dpm2m) needs no retraining: the modules are reused (and saved with it), and the result
    # is a fresh run's with that sampler
    sampler = toy_overrides(digits_npz) + ["module.sampler='heun'"]
    third = run(load_config("configs/fashion-silos.toml", sampler), out, resume=True)
    adds = [json.loads(l) for l in (out / "audit.jsonl").read_text().splitlines()]
    assert [a["client"] for a in adds if a["event"] == "add"][4:] == ["client-1"]
    assert [m["sha256"] for m in third["modules"]] == [m["sha256"] for m in first["modules"]]
    assert load_module(out / "modules" / "client-0").train_cfg["sampler"] == "heun"
    fresh = run(load_config("configs/fashion-silos.toml", sampler), tmp_path / "fresh")
    assert third["synthetic"]["sha256"] == fresh["synthetic"]["sha256"] != first["synthetic"]["sha256"]
    assert third["metrics"] == fresh["metrics"]


def test_a_failing_quality_report_keeps_the_runs_results(digits_npz, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ValueError("a defect in a metric")

    monkeypatch.setattr("fedfactory.server.quality_report", broken)
    res = run(load_config("configs/fashion-silos.toml", toy_overrides(digits_npz)), tmp_path / "run")
    assert res["metrics"]["accuracy"] > 0.25
    assert "ValueError: a defect in a metric" in res["quality"]["note"] and "modules" not in res["quality"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["metrics"] == res["metrics"]
    assert "quality report failed" in (tmp_path / "run" / "report.md").read_text()
    assert "the run's results are kept" in capsys.readouterr().err


def test_removing_a_module_leaves_the_others_byte_identical(digits_npz, tmp_path):
    cfg = load_config("configs/fashion-silos.toml", toy_overrides(digits_npz))
    out = tmp_path / "run"
    run(cfg, out)
    mods = [load_module(p) for p in sorted((out / "modules").iterdir())]
    full = synthesize(mods, 4, 40, cfg.seed, progress=False)
    without = synthesize([m for m in mods if m.client_id != "client-2"], 4, 40, cfg.seed,
                         missing_classes="drop", progress=False)
    assert without.missing_classes == [2]
    for c in (0, 1, 3):
        assert np.array_equal(full.images[full.labels == c], without.images[without.labels == c])


def test_parallel_client_training_gives_the_same_modules(digits_npz, tmp_path):
    base = toy_overrides(digits_npz) + ["runtime.threads=1"]
    seq = run(load_config("configs/fashion-silos.toml", base), tmp_path / "seq")
    par = run(load_config("configs/fashion-silos.toml", base + ["runtime.parallel_clients=2"]), tmp_path / "par")
    assert [m["sha256"] for m in par["modules"]] == [m["sha256"] for m in seq["modules"]]
    assert par["metrics"] == seq["metrics"]
    assert read_curves(tmp_path / "par/curves.csv") == read_curves(tmp_path / "seq/curves.csv")  # from the workers too
