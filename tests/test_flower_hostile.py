"""Hostile sites and faults against a real Flower federation on loopback. A hostile site runs the
honest ClientApp with tests/hostile_site/sitecustomize.py on its PYTHONPATH, which rewrites what it
sends. Every attack ends in a rejection that names the node; nothing is written outside the run
folder and no folder is deleted."""

import json
import re
import threading
import time
from pathlib import Path

import pytest

from fedfactory.config import load_config
from fedfactory.runners.embedded import run
from fedfactory.runners.flower.federation import LocalFederation, failure_lines, flower_tools_missing, run_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(flower_tools_missing()), reason="Flower CLI not installed")]

HOSTILE = str(Path(__file__).parent / "hostile_site")
GO_ON = ["federation.on_node_failure='continue'", "factory.missing_classes='drop'"]


def attack(name: str, **extra) -> dict:
    return {"PYTHONPATH": HOSTILE, "FEDFACTORY_HOSTILE": name, **extra}


def _stop_when_marked(fed: LocalFederation, node: str, mark: Path, timeout: float = 600) -> threading.Thread:
    """Kill `node` once its site has begun training, not at a fixed time: on a loaded machine a timer could
    kill it before it even registers with the SuperLink."""
    def watch():
        end = time.monotonic() + timeout
        while not mark.exists() and time.monotonic() < end:
            time.sleep(0.2)
        if mark.exists():
            fed.stop(node)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _rejections(log: str) -> dict[int, str]:
    """node id -> why, from the ServerApp's one-line reports."""
    out = {}
    for line in failure_lines(log):
        m = re.match(r"node (\d+): (.*)", line)
        if m:
            out[int(m.group(1))] = m.group(2)
    return out


def test_hostile_sites_are_rejected_by_node_and_harm_nothing(toy_config, tmp_path):
    victim = tmp_path / "victim"  # where "../../victim" from out/modules/ points
    victim.mkdir()
    (victim / "patients.csv").write_text("precious")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = tmp_path / "run"
    # node 0 honest; 1 writes to a path; 2 declares a billion-parameter network; 3 claims a class outside
    # the federation with an inflated count; 4 never answers; 5 is killed while it trains
    configs = [{"partition-id": p, "num-partitions": 3} for p in (0, 1, 2, 1, 2, 1)]
    mark = tmp_path.parent / f"{tmp_path.name}-training"  # outside tmp_path: the test checks nothing lands there
    envs = [{}, attack("traversal"), attack("huge"), attack("classes"), attack("silent"),
            attack("slow", FEDFACTORY_MARK=str(mark))]
    with LocalFederation(6, configs, node_envs=envs) as fed:
        _stop_when_marked(fed, "supernode-5", mark)
        # 100 s: Flower notices a dead node only when it misses two 30 s heartbeats
        result = fed.run(run_config(toy_config, out, GO_ON, num_nodes=6, timeout=100), timeout=400)
    assert result["status"] == "finished:completed", result["log"][-3000:]
    why = _rejections(result["log"])
    assert len(why) == 5, why  # five different nodes, each named
    reasons = sorted(why.values())
    for expected in ("client id '../../victim' is not allowed", "parameters, over the cap",
                     "classes must be distinct sorted class ids in 0..2"):
        assert sum(expected in r for r in reasons) == 1, (expected, reasons)
    assert sum("no reply within 100 s" in r for r in reasons) == 1, reasons  # the silent node
    assert sum("Node Unavailable" in r for r in reasons) == 1, reasons  # the killed one: its heartbeat stopped
    results = json.loads((out / "results.json").read_text())
    assert [m["client"] for m in results["modules"]] == ["client-0"]
    assert (victim / "patients.csv").read_text() == "precious"
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert [p for p in after if p not in before and p.parts[0] != "run"] == []  # nothing written outside the run
    assert not (out / ".incoming").exists()


def test_an_authenticated_node_cannot_upload_as_another_hospital(toy_config, tmp_path):
    """With TLS and SuperNode authentication each key is registered under its client id: the server
    decides who a node is, so node 2's claim to be client-0 is refused, whatever order replies come in."""
    envs = [{}, {}, attack("impersonate", FEDFACTORY_VICTIM_ID="client-0")]
    with LocalFederation(3, tls=True, node_envs=envs) as fed:
        result = fed.run(run_config(toy_config, tmp_path / "run", GO_ON, num_nodes=3, timeout=120), timeout=400)
        impostor = fed.node_ids[2]
    assert result["status"] == "finished:completed", result["log"][-3000:]
    why = _rejections(result["log"])
    assert list(why) == [impostor] and "claims client id 'client-0'" in why[impostor] \
        and "may upload only as 'client-2'" in why[impostor]
    modules = json.loads((tmp_path / "run/results.json").read_text())["modules"]
    assert [m["client"] for m in modules] == ["client-0", "client-1"]
    embedded = run(load_config(toy_config, GO_ON + ["partition.exclude=['client-2']"]), tmp_path / "embedded")
    assert modules[0]["sha256"] == embedded["modules"][0]["sha256"]  # the honest client-0's, not the impostor's


def test_a_superlink_restart_fails_the_run_cleanly_and_resume_keeps_the_modules(toy_config, tmp_path):
    out = tmp_path / "run"
    envs = [{}, {}, attack("slow", FEDFACTORY_DELAY="40")]  # node 2 is slow: the others' modules land first
    with LocalFederation(3, node_envs=envs) as fed:
        def crash():
            deadline = time.monotonic() + 200
            while not all((out / "modules" / c).exists() for c in ("client-0", "client-1")):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.2)
            fed.restart_superlink()
        threading.Thread(target=crash, daemon=True).start()
        first = fed.run(run_config(toy_config, out, num_nodes=3, timeout=200), timeout=400)
    assert first["status"] == "failed: the SuperLink stopped"
    assert not (out / "results.json").exists()
    # the consortium starts again (a new SuperLink, the sites reconnect) and resumes the run
    with LocalFederation(3) as fed:
        second = fed.run(run_config(toy_config, out, resume=True, num_nodes=3, timeout=200), timeout=400)
    assert second["status"] == "finished:completed", second["log"][-3000:]
    adds = [json.loads(l)["client"] for l in (out / "audit.jsonl").read_text().splitlines()]
    assert sorted(adds) == ["client-0", "client-1", "client-2"]  # received once each: the resume reused two
    embedded = run(load_config(toy_config), tmp_path / "embedded")
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["metrics"] == embedded["metrics"]
    assert [m["sha256"] for m in resumed["modules"]] == [m["sha256"] for m in embedded["modules"]]
