"""benchmarks/synthesis_levers.py on a toy run (its measurement: the command in benchmarks/README.md)."""

import importlib.util
import json
from pathlib import Path

import pytest

from fedfactory.config import load_config
from fedfactory.runners.embedded import run
from test_end_to_end import digits_npz, toy_overrides  # noqa: F401  (fixture)

_spec = importlib.util.spec_from_file_location("levers", Path(__file__).parents[1] / "benchmarks" / "synthesis_levers.py")
levers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(levers)


def test_the_run_s_own_settings_reproduce_its_result_and_other_variants_differ(digits_npz, tmp_path):  # noqa: F811
    res = run(load_config("configs/fashion-silos.toml", toy_overrides(digits_npz)), tmp_path / "run")
    assert levers.main(["--run", str(tmp_path / "run"), "--variant", "heun:3:40", "--variant", "dpm2m:3:20",
                        "--out", str(tmp_path / "levers.json")]) == 0
    own, other = json.loads((tmp_path / "levers.json").read_text())["variants"]
    assert own["synthetic_sha256"] == res["synthetic"]["sha256"] and own["accuracy"] == res["metrics"]["accuracy"]
    assert other["synthetic_images"] == 80 and other["synthetic_sha256"] != own["synthetic_sha256"]
    assert other["synthesis_seconds"] > 0 and 0 <= other["accuracy"] <= 1


def test_a_malformed_variant_is_a_clear_error():
    with pytest.raises(SystemExit, match="SAMPLER:STEPS:PER_CLASS"):
        levers.parse_variant("euler:10")
