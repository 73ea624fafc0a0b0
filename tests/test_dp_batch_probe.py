"""benchmarks/dp_batch_probe.py at toy size (its measurement: the command in benchmarks/README.md)."""

import json

import pytest

from helpers import benchmark_script, toy_overrides

probe = benchmark_script("dp_batch_probe")


def test_each_variant_trains_a_dp_module_at_the_target_epsilon_and_is_measured(digits_npz, tmp_path):
    sets = toy_overrides(digits_npz) + ["module.budget_images=256", "quality.reference_budget=512", "privacy.epsilon=10"]
    out = tmp_path / "probe.json"
    assert probe.main(["configs/fashion-silos.toml", "--client", "client-1", *sum((["--set", s] for s in sets), []),
                       "--variant", "16:0.002", "--variant", "64:0.004", "--samples", "20", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["class"] == 1 and [(r["batch"], r["lr"]) for r in res["rows"]] == [(16, 0.002), (64, 0.004)]
    small, large = res["rows"]
    assert small["steps"] == 16 and large["steps"] == 4  # the budget in images is kept
    for r in res["rows"]:
        assert 0 < r["epsilon"] <= 10 and r["noise_multiplier"] > 0
        assert 0 <= r["recognized"] <= 1 and r["fid"] >= 0 and r["synthetic"] == 20


def test_a_malformed_variant_is_a_clear_error():
    with pytest.raises(SystemExit, match="BATCH:LR"):
        probe.parse_variant("256")
