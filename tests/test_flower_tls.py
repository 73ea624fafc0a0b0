"""The Flower federation with TLS and SuperNode authentication, on loopback: the one-shot exchange
is unchanged, and a SuperNode whose key was never registered cannot join."""

import json
import subprocess
import time
from pathlib import Path

import pytest

from fedfactory.runners.flower.federation import LocalFederation, federate, flower_tools_missing, write_node_keys
from helpers import assert_same_run

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(flower_tools_missing()), reason="Flower CLI not installed")]


def test_one_shot_federation_over_tls_matches_the_embedded_run(toy_config, tmp_path):
    from fedfactory.config import load_config
    from fedfactory.runners.embedded import run

    result = federate(toy_config, 3, tmp_path / "flower", timeout=300, tls=True)
    assert result["status"] == "finished:completed"
    assert "Uvicorn running on https://" in (Path(result["workdir"]) / "superlink.log").read_text()
    embedded = run(load_config(toy_config), tmp_path / "embedded")
    assert_same_run(tmp_path / "flower", tmp_path / "embedded", embedded)
    # every module came from a node the SuperLink knows by its registered key
    sources = {json.loads(l)["source"] for l in (tmp_path / "flower/audit.jsonl").read_text().splitlines()}
    assert sources == {f"flower node {nid}" for nid in result["node_ids"]} and len(sources) == 3


def test_an_unregistered_supernode_is_refused(tmp_path):
    with LocalFederation(2, tls=True) as fed:
        private, _ = write_node_keys(tmp_path / "stranger")  # a valid key pair, never registered
        stranger = fed.start_node("stranger", "partition-id=0 num-partitions=2", private)
        # a node without a key asks the SuperLink to register it: that is what auth turns off
        keyless = fed.start_node("keyless", "partition-id=1 num-partitions=2")
        for p in (stranger, keyless):
            try:
                assert p.wait(30) != 0
            except subprocess.TimeoutExpired:
                pytest.fail(f"an unregistered SuperNode is still running: {p.args}")
        assert "Failed to activate SuperNode" in (fed.work / "stranger.log").read_text()
        assert "SuperNode authentication is enabled" in (fed.work / "keyless.log").read_text()
        assert "No SuperNode found with the given public key" in (fed.work / "superlink.log").read_text()
        deadline = time.monotonic() + 30
        while True:  # the registered ones join, and they are the only nodes the SuperLink has
            nodes = {int(n["node-id"]): n["status"] for n in fed.nodes()}
            if set(nodes.values()) == {"online"} or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert nodes == {nid: "online" for nid in fed.node_ids} and len(nodes) == 2
