"""The model in use: `fedfactory predict` gives a run's own answers on its test images, the ONNX export
gives torch's, and report.md is a model card."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fedfactory.classify import build_classifier
from fedfactory.classify.model import FederatedClassifier, load_classifier_file
from fedfactory.cli import main
from fedfactory.config import load_config
from fedfactory.export import run_onnx, to_onnx
from fedfactory.tensors import use_bf16
from fedfactory.predict import predict_to_csv
from fedfactory.runners.embedded import prepare_data, run
from fedfactory.runners.files import server_build
from fedfactory.server import evaluation_split
from helpers import toy_overrides, write_image_folder


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def random_model(mode="local", missing=(2,), names=("a", "b", "c"), shape=(8, 8, 1)):
    """A classifier of untrained networks: enough to test the file, prediction and export plumbing."""
    nets = {"hospital-a": build_classifier(shape[2], len(names), "cpu", 4).eval()}
    if mode == "local":
        nets["hospital-b"] = build_classifier(shape[2], len(names), "cpu", 4).eval()
    else:
        nets = {"server": nets["hospital-a"]}
    return FederatedClassifier.from_bytes(FederatedClassifier(nets, list(names), shape, mode, list(missing), "cpu",
                                                              4).to_bytes())


# -- fast: the plumbing, on untrained networks ----------------------------------------------------------

def test_onnx_holds_the_whole_decision_product_of_experts_and_missing_classes():
    model = random_model("local", missing=[2])
    blob = to_onnx(model)
    x = np.random.default_rng(0).integers(0, 256, (7, 8, 8, 1), dtype=np.uint8)
    proba, log_proba = run_onnx(blob, x)
    assert proba.shape == (7, 3) and proba.dtype == np.float32 and not proba[:, 2].any()
    assert np.isneginf(log_proba[:, 2]).all()
    np.testing.assert_allclose(proba, model.predict_proba(x), atol=1e-5)
    one = FederatedClassifier({"hospital-a": model.nets["hospital-a"]}, model.class_names, model.image_shape, "local", [2])
    assert np.abs(run_onnx(to_onnx(one), x)[0] - proba).max() > 1e-3  # the second expert is in the graph


def test_the_api_predicts_on_files_as_on_arrays_and_the_csv_quotes_class_names(tmp_path):
    names = ['tumour, "grade 2"', "no tumour"]
    model = random_model("server", missing=[], names=names, shape=(8, 8, 3))
    x = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    paths = []
    for i, img in enumerate(x):
        paths.append(tmp_path / "scans" / f"{i}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(img).save(paths[-1])
    Image.fromarray(x[0]).resize((20, 20)).save(tmp_path / "big.png")  # resized to 8 x 8 as training did
    assert np.array_equal(model.predict_proba([str(p) for p in paths]), model.predict_proba(x))
    assert model.predict(paths[0]).shape == (1,) and list(model.classes_) == [0, 1]
    assert model.predict_proba(tmp_path / "big.png").shape == (1, 2)
    (tmp_path / "list.csv").write_text("path\n" + "".join(f"scans/{i}.png\n" for i in range(4)))
    summary = predict_to_csv(model, tmp_path / "list.csv", tmp_path / "p.csv", progress=False)
    assert summary["images"] == 4 and summary["accuracy"] is None
    rows = read_csv(tmp_path / "p.csv")
    assert list(rows[0]) == ["path", "predicted", f"p_{names[0]}", f"p_{names[1]}"]
    assert [r["predicted"] for r in rows] == [names[i] for i in model.predict(x, "cpu", use_bf16(torch.device("cpu")))]


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
    model = random_model()
    (tmp_path / "model.safetensors").write_bytes(model.to_bytes())
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 100)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    cases = [(["predict", str(tmp_path / "bad.safetensors"), "--images", str(tmp_path), "--out", str(tmp_path / "p.csv")],
              "not a fedfactory classifier"),
             (["predict", str(tmp_path / "model.safetensors"), "--images", str(tmp_path / "empty"),
               "--out", str(tmp_path / "p.csv")], "holds no images"),
             (["predict", str(tmp_path / "model.safetensors"), "--images", str(tmp_path / "nowhere"),
               "--out", str(tmp_path / "p.csv")], "does not exist"),
             (["export", str(tmp_path / "bad.safetensors"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")],
              "not a fedfactory classifier")]
    for argv, why in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fedfactory: error:") and why in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "m.onnx").exists()


# -- slow: one toy run per mode --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(digits_npz, tmp_path_factory):
    """A toy run in each mode (local: simulated sites; server: the same modules through server build), and
    the run's own test images as class folders, as a hospital keeps them."""
    root = tmp_path_factory.mktemp("runs")
    toy = ["partition.clients=2", "module.budget_images=1024", "quality.reference_budget=0"]
    cfg = load_config("configs/fashion-silos.toml", toy_overrides(digits_npz, "local") + toy)
    out = {"local": (run(cfg, root / "local"), root / "local")}
    cfg = load_config("configs/fashion-silos.toml", toy_overrides(digits_npz, "server") + toy)
    modules = [str(d) for d in sorted((root / "local" / "modules").iterdir())]
    out["server"] = (server_build(cfg, modules, f"npz:{digits_npz}", root / "server"), root / "server")
    test = evaluation_split(cfg, prepare_data(cfg)[0])
    write_image_folder(root / "test", test.images, test.labels, test.class_names)
    return out, root / "test", test


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["server", "local"])
def test_predict_on_the_test_folder_reproduces_the_runs_accuracy(runs, mode, tmp_path, capsys, digits_npz):
    (results, run_dir), folder, test = runs[0][mode], runs[1], runs[2]
    model = run_dir / "model.safetensors"
    assert main(["predict", str(model), "--images", str(folder), "--out", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr().out
    rows = read_csv(tmp_path / "p.csv")
    truth = [r["path"].split("/")[-2] for r in rows]
    correct = sum(r["predicted"] == t for r, t in zip(rows, truth))
    assert len(rows) == len(test.labels) and correct / len(rows) == results["metrics"]["accuracy"]
    assert f"accuracy {results['metrics']['accuracy']:.4f} ({correct} of {len(rows)} images" in out
    p = np.array([[float(r[f"p_{c}"]) for c in test.class_names] for r in rows])
    assert np.allclose(p.sum(1), 1, atol=1e-4) and p.min() >= 0
    # the same images unlabelled, in nested folders: the same answers, and no accuracy
    expected = {}
    for i, (r, t) in enumerate(zip(rows[::5], truth[::5])):
        name = f"{t}-{r['path'].split('/')[-1]}"
        (tmp_path / "nested" / f"d{i % 3}" / "deeper").mkdir(parents=True, exist_ok=True)
        (tmp_path / "nested" / f"d{i % 3}" / "deeper" / name).write_bytes(open(r["path"], "rb").read())
        expected[name] = r["predicted"]
    assert main(["predict", str(model), "--images", str(tmp_path / "nested"), "--out", str(tmp_path / "u.csv")]) == 0
    assert "accuracy" not in capsys.readouterr().out
    assert {r["path"].split("/")[-1]: r["predicted"] for r in read_csv(tmp_path / "u.csv")} == expected
    # an .npz's test arrays: rows FILE#INDEX, and its labels give the same accuracy
    s = predict_to_csv(load_classifier_file(model), digits_npz, tmp_path / "n.csv", progress=False)
    assert s["accuracy"] == results["metrics"]["accuracy"]
    assert read_csv(tmp_path / "n.csv")[3]["path"] == f"{digits_npz}#3"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["server", "local"])
def test_the_onnx_export_gives_torchs_answer_on_every_test_image(runs, mode, tmp_path, capsys):
    import onnx

    (_, run_dir), test = runs[0][mode], runs[2]
    assert main(["export", str(run_dir / "model.safetensors"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert "onnxruntime matches torch" in capsys.readouterr().out
    blob = (tmp_path / "m.onnx").read_bytes()
    model = load_classifier_file(run_dir / "model.safetensors")
    proba, _ = run_onnx(blob, test.images)
    torch_proba = np.exp(model.predict_log_proba(test.images, "cpu", bf16=False))
    assert np.array_equal(proba.argmax(1), torch_proba.argmax(1))
    assert np.abs(proba - torch_proba).max() < 1e-4
    meta = {p.key: p.value for p in onnx.load_from_string(blob).metadata_props}
    assert json.loads(meta["class_names"]) == model.class_names and meta["classifier_sha256"] == model.file_sha256
    assert len(model.nets) == (1 if mode == "server" else 2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["server", "local"])
def test_the_report_is_a_model_card(runs, mode, digits_npz):
    (results, run_dir) = runs[0][mode]
    card = (run_dir / "report.md").read_text()
    for section in ("## Model", "## Intended use", "## Metrics", "## Per class", "## Data by site", "## Privacy",
                    "## Limitations"):
        assert f"\n{section}" in card, section
    assert results["model"]["sha256"][:16] in card and "not a medical device" in card
    assert ("Trained on synthetic images only" in card) is (mode == "server")
    assert ("Product of Experts of 2 site experts" in card) is (mode == "local")
    assert f"npz:{digits_npz}" in card and f"({results['test']['images']:,} images)" in card
    n = results["clients"]["client-1"]
    assert n[0] == n[2] == 0 and f"| client-1 | 0 | {n[1]} | 0 | {n[3]} | {sum(n)} |" in card
