"""A real Flower deployment on loopback: a SuperLink, 3 SuperNodes, the one-shot exchange."""

import json

import numpy as np
import pytest

from fedfactory.errors import FedFactoryError
from fedfactory.report import read_curves
from fedfactory.runners.flower.federation import LocalFederation, federate, flower_tools_missing
from helpers import assert_same_run, write_image_folder

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(flower_tools_missing()), reason="Flower CLI not installed")]


def test_one_shot_federation_matches_the_embedded_run(toy_config, tmp_path):
    from fedfactory.config import load_config
    from fedfactory.runners.embedded import run

    kept = tmp_path / "kept"
    result = federate(toy_config, 3, tmp_path / "flower", node_configs=[{"keep-dir": str(kept)}] * 3, timeout=300)
    assert result["status"] == "finished:completed"
    embedded = run(load_config(toy_config), tmp_path / "embedded")
    flower = json.loads((tmp_path / "flower/results.json").read_text())
    curves = read_curves(tmp_path / "embedded/curves.csv")
    for cid in ("client-0", "client-1", "client-2"):
        served = (tmp_path / "flower/modules" / cid / "module.safetensors").read_bytes()
        assert served == (kept / cid / "module.safetensors").read_bytes()  # what the client trained
        assert served == (tmp_path / "embedded/modules" / cid / "module.safetensors").read_bytes()
        # the site keeps its module's training loss; the server writes its classifier's: the embedded run's
        assert read_curves(kept / f"{cid}-curves.csv") == [r for r in curves if r["series"] == f"module/{cid}"]
    assert read_curves(tmp_path / "flower/curves.csv") == [r for r in curves if r["series"] == "classifier/server"]
    assert flower["metrics"] == embedded["metrics"]
    assert flower["synthetic"]["sha256"] == embedded["synthetic"]["sha256"]
    sources = [json.loads(l)["source"] for l in (tmp_path / "flower/audit.jsonl").read_text().splitlines()]
    assert all(s.startswith("flower node ") for s in sources) and len(sources) == 3


def test_local_mode_over_flower_matches_the_embedded_run(toy_config, tmp_path):
    from fedfactory.config import load_config
    from fedfactory.runners.embedded import run

    federate(toy_config, 3, tmp_path / "flower", overrides=["classifier.mode=local"], timeout=300)
    embedded = run(load_config(toy_config, ["classifier.mode=local"]), tmp_path / "embedded")
    flower = json.loads((tmp_path / "flower/results.json").read_text())
    assert flower["metrics"] == embedded["metrics"]
    for cid in ("client-0", "client-1", "client-2"):  # the experts the sites trained are the embedded ones
        assert (tmp_path / "flower/classifiers" / f"{cid}.safetensors").read_bytes() == \
            (tmp_path / "embedded/classifiers" / f"{cid}.safetensors").read_bytes()


def test_a_failing_client_fails_the_run_by_node_id(toy_config, tmp_path):
    # the third SuperNode is misconfigured: its partition does not exist
    bad = [{}, {}, {"partition-id": 7}]
    with pytest.raises(FedFactoryError) as e:
        federate(toy_config, 3, tmp_path / "run", node_configs=bad, timeout=300)
    msg = str(e.value)
    assert "finished:failed" in msg and "ClientApp failed" in msg and "node " in msg
    assert "client-7 is not a client" in msg or "client-7" in msg


def test_nodes_share_the_cores_unless_told_otherwise(tmp_path, monkeypatch):
    from fedfactory.runtime import DEFAULT_THREADS

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    fed = LocalFederation(3, workdir=tmp_path, node_envs=[{}, {"OMP_NUM_THREADS": "7"}, {}])
    share = str(max(1, DEFAULT_THREADS // 3))
    assert [e["OMP_NUM_THREADS"] for e in fed.node_envs] == [share, "7", share]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's own setting reaches the nodes unchanged
    assert all("OMP_NUM_THREADS" not in e for e in LocalFederation(3, workdir=tmp_path).node_envs)


def test_processes_are_stopped():
    with LocalFederation(1) as fed:
        procs = list(fed.procs.values())
        assert all(p.poll() is None for p in procs)
    assert all(p.poll() is not None for p in procs)


def test_sites_use_their_own_folders_and_the_server_holds_only_a_test_set(toy_config, tmp_path):
    """Each SuperNode reads its own class folders; the ServerApp gets a test-only .npz, and the config's
    data set does not exist at all, so reading any training image at the server would fail the run."""
    from fedfactory.config import load_config
    from fedfactory.runners.embedded import prepare_data, run
    from fedfactory.server import evaluation_split

    names = ["class 0", "class 1", "class 2"]
    cfg = load_config(toy_config, [f"data.classes={names}"])
    ds, part = prepare_data(cfg)
    for cid, idx in part.indices.items():
        write_image_folder(tmp_path / "sites" / cid, ds.x_train[idx], ds.y_train[idx], names)
    test = evaluation_split(cfg, ds)
    np.savez(tmp_path / "test-only.npz", x_test=test.images, y_test=test.labels)
    embedded = run(cfg, tmp_path / "embedded")

    nowhere = [f"data.name='npz:{tmp_path / 'no-training-set-here.npz'}'", f"data.classes={names}"]
    sites = [{"data": str(tmp_path / "sites" / f"client-{i}")} for i in range(3)]
    result = federate(toy_config, 3, tmp_path / "flower", overrides=nowhere, node_configs=sites,
                      test=str(tmp_path / "test-only.npz"), timeout=300)
    assert result["status"] == "finished:completed"
    assert_same_run(tmp_path / "flower", tmp_path / "embedded", embedded)
