"""Exact modular unlearning: removing a client equals never having had it, bit for bit."""

import json

import numpy as np
import pytest

from fedfactory.cli import main
from fedfactory.config import load_config
from fedfactory.errors import FedFactoryError
from fedfactory.runners.embedded import run
from fedfactory.runners.unlearn import unlearn
from helpers import toy_overrides

pytestmark = pytest.mark.slow


def test_unlearning_equals_a_federation_without_the_client(digits_npz, tmp_path):
    # pathological:2 over 4 clients: client i holds classes i and i+1 (mod 4), so every class stays covered
    overrides = toy_overrides(digits_npz, scheme="pathological:2")
    full = run(load_config("configs/fashion-silos.toml", overrides), tmp_path / "abcd")
    after = unlearn(tmp_path / "abcd", "client-2", out=tmp_path / "abd", reason="consent withdrawn")
    fresh = run(load_config("configs/fashion-silos.toml", overrides + ["partition.exclude=['client-2']"]), tmp_path / "fresh")

    assert after["unlearning"]["orphaned_classes"] == []
    assert after["synthetic"]["sha256"] == fresh["synthetic"]["sha256"] != full["synthetic"]["sha256"]
    assert (tmp_path / "abd/classifiers/server.safetensors").read_bytes() == \
        (tmp_path / "fresh/classifiers/server.safetensors").read_bytes()
    assert after["metrics"] == fresh["metrics"]
    # the quality report's reference is retrained without client-2's images: the same as the fresh run's
    assert (tmp_path / "abd/classifiers/reference.safetensors").read_bytes() == \
        (tmp_path / "fresh/classifiers/reference.safetensors").read_bytes() != \
        (tmp_path / "abcd/classifiers/reference.safetensors").read_bytes()
    assert after["quality"] == fresh["quality"] and "client-2" not in after["quality"]["modules"]
    assert not (tmp_path / "abd/modules/client-2").exists()
    assert sorted(p.name for p in (tmp_path / "abd/modules").iterdir()) == ["client-0", "client-1", "client-3"]
    log = [json.loads(l) for l in (tmp_path / "abd/audit.jsonl").read_text().splitlines()]
    assert log[-1]["event"] == "remove" and log[-1]["client"] == "client-2" and log[-1]["reason"] == "consent withdrawn"
    report = (tmp_path / "abd/report.md").read_text()
    assert "client-2" in report and "| accuracy |" in report and "before" in report
    # the original run is untouched
    assert (tmp_path / "abcd/modules/client-2/module.safetensors").exists()

    # the rebuild took the kept modules' draws from the run's shards; only draws the new plan changed
    # (classes 2 and 3, which client-2 shared) were sampled again, and none of client-2's images came along
    drawn = {(d["client"], d["class"], d["n"], d["seed"]) for d in full["synthetic"]["sources"]}
    assert [d["reused"] for d in after["synthetic"]["sources"]] == \
        [(d["client"], d["class"], d["n"], d["seed"]) in drawn for d in after["synthetic"]["sources"]]
    assert sum(d["reused"] for d in after["synthetic"]["sources"]) == 4
    assert not any(d["reused"] for d in fresh["synthetic"]["sources"] + full["synthetic"]["sources"])
    index = json.loads((tmp_path / "abd/synthetic/index.json").read_text())
    assert "client-2" not in {e["client"] for e in index.values()}
    assert sorted(p.name for p in (tmp_path / "abd/synthetic").iterdir()) == sorted([f"{k}.npy" for k in index] + ["index.json"])
    old = json.loads((tmp_path / "abcd/synthetic/index.json").read_text())
    forgotten = {(tmp_path / f"abcd/synthetic/{k}.npy").read_bytes() for k, e in old.items() if e["client"] == "client-2"}
    assert forgotten and not forgotten & {p.read_bytes() for p in (tmp_path / "abd/synthetic").glob("*.npy")}
    # a resumed run (the same folder) reuses every draw
    resumed = run(load_config("configs/fashion-silos.toml", overrides), tmp_path / "abcd", resume=True)
    assert all(d["reused"] for d in resumed["synthetic"]["sources"])
    assert resumed["synthetic"]["sha256"] == full["synthetic"]["sha256"] and resumed["metrics"] == full["metrics"]


def test_unlearning_a_sole_holder_drops_its_class(digits_npz, tmp_path):
    run(load_config("configs/fashion-silos.toml", toy_overrides(digits_npz)), tmp_path / "silos")
    with pytest.raises(FedFactoryError, match="only holder of class"):
        unlearn(tmp_path / "silos", "client-1", orphaned="error")
    assert not (tmp_path / "silos-without-client-1").exists()
    after = unlearn(tmp_path / "silos", "client-1")
    assert after["unlearning"]["orphaned_classes"] == [1]
    cm = np.array(after["metrics"]["confusion_matrix"])
    assert cm[:, 1].sum() == 0  # class 1 is never predicted
    assert after["missing_classes"] == [1]
    assert "never predicted" in (tmp_path / "silos-without-client-1/report.md").read_text()


def test_verify_finds_tampering(digits_npz, tmp_path, capsys):
    run(load_config("configs/fashion-silos.toml", toy_overrides(digits_npz)), tmp_path / "r")
    assert main(["verify", str(tmp_path / "r")]) == 0
    w = tmp_path / "r/modules/client-3/module.safetensors"
    data = bytearray(w.read_bytes())
    data[100] ^= 0xFF
    w.write_bytes(bytes(data))
    assert main(["verify", str(tmp_path / "r")]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH client-3" in out and "3 of 4 modules verified" in out
    assert main(["unlearn", str(tmp_path / "r"), "--client", "client-9"]) == 2
