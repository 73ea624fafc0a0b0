"""The public Python API: `import fedfactory` is cheap, help() lists the API, and the README's example
runs as written (at toy size)."""

import csv
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fedfactory
from fedfactory.config import dumps, load_config
from helpers import toy_overrides

README = Path(__file__).resolve().parents[1] / "README.md"
API = {"load_config", "run", "compare", "unlearn", "site_train", "site_audit", "site_expert", "site_evaluate",
       "server_build", "server_pool", "load_module", "load_classifier", "predict_to_csv", "to_onnx", "FedFactoryError"}


def test_import_is_cheap_and_help_lists_the_api():
    lazy = subprocess.run([sys.executable, "-c", "import sys, fedfactory; print(sorted(m for m in ('torch', 'numpy', "
                           "'flwr') if m in sys.modules))"], capture_output=True, text=True, check=True)
    assert lazy.stdout.strip() == "[]"
    assert set(fedfactory.__all__) >= API | {"__version__"}
    text = pydoc.render_doc(fedfactory, renderer=pydoc.plaintext)
    for name in API:
        assert callable(getattr(fedfactory, name)), name
        assert re.search(rf"^\s+{name}\(", text, re.M) or f"class {name}" in text, name
    assert fedfactory.load_classifier is __import__("fedfactory.classify.model").classify.model.load_classifier_file
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        fedfactory.nothing


def readme_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its <!-- api-example --> python block"
    return match.group(1)


@pytest.mark.slow
def test_the_readme_example_runs_as_written(digits_npz, tmp_path, monkeypatch, capsys):
    """The example's own paths in a folder that holds a toy config under the main job's name and a few scans."""
    toy = ["partition.clients=2", "module.budget_images=512", "factory.per_class=20", "classifier.budget_images=512",
           "quality.reference_budget=0", "privacy.holdout=0"]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "fashion-silos.toml").write_text(
        dumps(load_config("configs/fashion-silos.toml", toy_overrides(digits_npz) + toy)))
    x = np.load(digits_npz)["x_test"][:12]
    (tmp_path / "scans").mkdir()
    for i, img in enumerate(x):
        Image.fromarray(img).save(tmp_path / "scans" / f"{i:02d}.png")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(readme_example(), "README.md api-example", "exec"), scope)
    assert scope["cfg"].seed == 1 and (tmp_path / "runs/api/report.md").exists()
    assert scope["proba"].shape == (12, 4) and np.allclose(scope["proba"].sum(1), 1)
    assert np.allclose(scope["proba"], scope["model"].predict_proba(x[..., None]), atol=1e-6)  # files read as arrays
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == scope["files"] == [f"scans/{i:02d}.png" for i in range(12)]
    assert len(scope["labels"]) == 12 and set(scope["labels"]) <= set(scope["model"].class_names)
    assert "accuracy" in capsys.readouterr().out
