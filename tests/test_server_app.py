"""The ServerApp's identity rules, with a stand-in for Flower's Grid: who may upload as whom."""

import json

import numpy as np
import pytest

from fedfactory.config import load_config
from fedfactory.errors import FedFactoryError
from fedfactory.modules.diffusion import DiffusionModule
from fedfactory.modules.limits import Limits
from fedfactory.runners.flower.messages import have_content, module_content
from fedfactory.runners.flower.server_app import collect_modules, parse_node_map
from helpers import FakeGrid

pytestmark = pytest.mark.usefixtures("in_a_run")  # Flower builds Messages only in a run


@pytest.fixture(scope="module")
def module_bytes():
    x = np.random.default_rng(0).integers(0, 255, (32, 8, 8, 1), dtype=np.uint8)
    m = DiffusionModule({"channels": 8, "channel_mult": [1, 2], "num_blocks": 1}, {"budget_images": 32, "batch_size": 16},
                        client_id="client-0", progress=False).fit(x, np.full(32, 1))
    return m.to_bytes()


def as_client(blob_manifest, cid):
    blob, manifest = blob_manifest
    return module_content(blob, {**manifest, "client_id": cid})


def test_the_server_decides_who_a_node_is(module_bytes, tmp_path):
    cfg = load_config(None, ["federation.clients=['client-0', 'client-1']", "privacy.holdout=0"])
    limits = Limits(image_shape=(8, 8, 1), num_classes=2)
    replies = {11: as_client(module_bytes, "client-0"), 22: as_client(module_bytes, "client-0"),   # a duplicate
               33: as_client(module_bytes, "client-9"), 44: as_client(module_bytes, "client-1")}   # off the roster
    modules, owners, failures = collect_modules(FakeGrid(replies), [11, 22, 33, 44], cfg, tmp_path, 5, limits)
    assert owners == {"client-0": 11, "client-1": 44} and sorted(m.client_id for m in modules) == ["client-0", "client-1"]
    assert "already uploaded by node 11" in failures[22] and "not on the federation's roster" in failures[33]

    # with a node map, node 22 is client-0 and node 11 an impostor, whatever the order of replies
    out = tmp_path / "mapped"
    modules, owners, failures = collect_modules(FakeGrid(replies), [11, 22], cfg, out, 5, limits,
                                                assigned={11: "client-1", 22: "client-0"})
    assert owners == {"client-0": 22} and "may upload only as 'client-1'" in failures[11]
    assert sorted(p.name for p in (out / "modules").iterdir()) == ["client-0"]


def test_a_resumed_run_takes_have_only_for_modules_it_holds(module_bytes, tmp_path):
    cfg, limits = load_config(None, ["privacy.holdout=0"]), Limits(image_shape=(8, 8, 1), num_classes=2)
    collect_modules(FakeGrid({1: as_client(module_bytes, "client-0")}), [1], cfg, tmp_path, 5, limits)
    from fedfactory.runners.flower.server_app import kept_modules

    kept = kept_modules(cfg, tmp_path, limits)
    grid = FakeGrid({1: have_content("client-0"), 2: have_content("client-1")})  # client-1 was never received
    modules, owners, failures = collect_modules(grid, [1, 2], cfg, tmp_path, 5, limits, kept=kept)
    assert owners == {"client-0": 1} and "it does not" in failures[2]
    assert json.loads(str(grid.sent[1].content["fedfactory"]["have"])) == ["client-0"]


def test_node_map_syntax():
    assert parse_node_map("") is None
    assert parse_node_map("12=hospital-a; 34=hospital-b") == {12: "hospital-a", 34: "hospital-b"}
    for bad in ("12:hospital-a", "x=hospital-a", "12=../etc"):
        with pytest.raises(FedFactoryError):
            parse_node_map(bad)


def test_a_site_refuses_hostile_modules_in_local_mode(module_bytes, tmp_path):
    """The other sites' modules reach a site in the expert message: one whose client id is a path, or
    whose declared network is over the caps, is refused there, and nothing is written outside."""
    from flwr.app import Context, Message, RecordDict
    from PIL import Image

    from fedfactory.config import dumps
    from fedfactory.modules.fileformat import ModuleFileError
    from fedfactory.runners.flower import client_app
    from fedfactory.runners.flower.messages import config_content

    site = tmp_path / "hospital-b" / "b"
    site.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(site / f"{i}.png")
    cfg = load_config(None, ["data.classes=['a', 'b']", "classifier.mode='local'", "runtime.progress=false"])
    context = Context(run_id=1, node_id=1, node_config={"data": str(tmp_path / "hospital-b")}, state=RecordDict(),
                      run_config={})
    blob, manifest = module_bytes
    huge = {"channels": 1024, "channel_mult": [16] * 6, "num_blocks": 8, "attn_resolutions": [], "dropout": 0.0}
    for hostile, why in (({**manifest, "client_id": "../../victim"}, "client id"),
                         ({**manifest, "arch": huge}, "parameters, over the cap")):
        msg = Message(config_content(dumps(cfg), "expert", [(blob, hostile)]), dst_node_id=1, message_type="train")
        with pytest.raises(ModuleFileError, match=why):
            client_app.train(msg, context)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hospital-b"]


def test_the_consortium_agreement_and_the_audit_are_checked_by_node(module_bytes, tmp_path):
    """A module outside its site's agreement (a class it may not declare, a count over its cap), or one
    with no audit where the federation asks for it, is refused by node id; the others are kept."""
    from fedfactory.roster import load_roster

    (tmp_path / "roster.toml").write_text('[sites.client-0]\nclasses = { "b" = 100 }\n'
                                          '[sites.client-1]\nclasses = { "a" = 100 }\n'
                                          '[sites.client-2]\nclasses = { "b" = 10 }\n')
    agreement = load_roster(tmp_path / "roster.toml", ["a", "b"])
    limits = Limits(image_shape=(8, 8, 1), num_classes=2)
    replies = {1: as_client(module_bytes, "client-0"), 2: as_client(module_bytes, "client-1"),
               3: as_client(module_bytes, "client-2"), 4: as_client(module_bytes, "client-3")}
    cfg = load_config(None, ["privacy.holdout=0"])
    modules, owners, failures = collect_modules(FakeGrid(replies), [1, 2, 3, 4], cfg, tmp_path / "run", 5, limits,
                                                agreement=agreement)
    assert owners == {"client-0": 1}
    assert "does not list" in failures[2] and "over the 10 of its agreement" in failures[3]
    assert "not in the consortium's roster" in failures[4]
    _, owners, failures = collect_modules(FakeGrid(replies), [1], load_config(None), tmp_path / "audited", 5, limits)
    assert not owners and "carries no privacy audit" in failures[1]
