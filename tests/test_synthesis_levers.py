"""benchmarks/synthesis_levers.py and classifier_levers.py on one toy run (their measurements: the
commands in benchmarks/README.md)."""

import json

import pytest

from fedfactory.config import load_config
from fedfactory.modules import load_module
from fedfactory.runners.embedded import run
from helpers import benchmark_script, toy_overrides

levers, classifier_levers = benchmark_script("synthesis_levers"), benchmark_script("classifier_levers")


@pytest.fixture(scope="module")
def toy_run(digits_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("levers") / "run"
    return out, run(load_config("configs/fashion-silos.toml", toy_overrides(digits_npz)), out)


def test_the_run_s_own_settings_reproduce_its_result_and_other_variants_differ(toy_run, tmp_path):
    out, res = toy_run
    # the shipped config samples with DPM-Solver++(2M); the toy run takes 3 steps
    assert levers.main(["--run", str(out), "--variant", "dpm2m:3:40", "--variant", "heun:3:20",
                        "--variant", "dpm2m:3:40:0.5", "--out", str(tmp_path / "levers.json")]) == 0
    own, other, stop = json.loads((tmp_path / "levers.json").read_text())["variants"]
    assert own["synthetic_sha256"] == res["synthetic"]["sha256"] and own["accuracy"] == res["metrics"]["accuracy"]
    assert own["sigma_min"] == other["sigma_min"] == load_module(out / "modules" / "client-0").train_cfg["sigma_min"]
    assert other["synthetic_images"] == 80 and other["synthetic_sha256"] != own["synthetic_sha256"]
    assert other["synthesis_seconds"] > 0 and 0 <= other["accuracy"] <= 1
    # a variant's own sigma_min is where the sampler stops: other images from the same modules and seed
    assert stop["sigma_min"] == 0.5 and stop["synthetic_sha256"] not in (own["synthetic_sha256"], other["synthetic_sha256"])


def test_the_classifier_levers_reuse_the_kept_set_and_base_is_the_run(toy_run, tmp_path):
    out, res = toy_run
    assert classifier_levers.main(["--run", str(out), "--variant", "base", "--variant", "mixup=0.4,label_smoothing=0.1",
                                   "--out", str(tmp_path / "clf.json")]) == 0
    report = json.loads((tmp_path / "clf.json").read_text())
    assert report["synthetic_sha256"] == res["synthetic"]["sha256"]  # the run's own synthetic images
    base, other = report["variants"]
    assert base["variant"] == "base" and base["accuracy"] == res["metrics"]["accuracy"]
    assert other["variant"] == "classifier.mixup=0.4,classifier.label_smoothing=0.1"
    assert other["final_loss"] != base["final_loss"] and 0 <= other["accuracy"] <= 1


def test_malformed_variants_are_clear_errors():
    with pytest.raises(SystemExit, match="SAMPLER:STEPS:PER_CLASS"):
        levers.parse_variant("euler:10")
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        classifier_levers.parse_variant("mixup")
