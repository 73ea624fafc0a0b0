"""Signed modules and a tamper-evident log: a site signs its module's manifest (which holds the weights'
hash) with its P-384 key; the server checks it against the key the roster lists for that site, by the
files route and over Flower; `fedfactory verify` re-checks signatures and the audit log's hash chain."""

import base64
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedfactory.cli import main
from fedfactory.config import dumps, load_config
from fedfactory.errors import FedFactoryError
from fedfactory.modules.diffusion import DiffusionModule
from fedfactory.modules.fileformat import write_module_dir
from fedfactory.modules.limits import Limits
from fedfactory.registry import append_audit, register, verify_audit
from fedfactory.roster import load_roster
from fedfactory.runners.files import server_build
from fedfactory.runners.flower.federation import write_node_keys
from fedfactory.runners.flower.messages import module_content
from fedfactory.runners.flower.server_app import collect_modules
from fedfactory.signing import sign_manifest, verify_manifest
from helpers import FakeGrid, write_image_folder

pytestmark = pytest.mark.usefixtures("in_a_run")  # Flower builds Messages only in a run

SERVER = ["data.classes=['a', 'b']", "data.size=8", "data.channels=1", "privacy.holdout=0", "factory.per_class=20",
          "factory.check_samples=0", "classifier.budget_images=128", "classifier.batch_size=32", "classifier.width=8",
          "quality.reference_budget=0", "runtime.progress=false", "runtime.threads=1"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two sites' key pairs (as made for SuperNode authentication), and a roster folder holding their public keys."""
    root = tmp_path_factory.mktemp("keys")
    pairs = {site: write_node_keys(root / site) for site in ("a", "b")}
    return root, pairs


@pytest.fixture(scope="module")
def module_bytes():
    x = np.random.default_rng(0).integers(0, 255, (32, 8, 8, 1), dtype=np.uint8)
    m = DiffusionModule({"channels": 8, "channel_mult": [1, 2], "num_blocks": 1}, {"budget_images": 32, "batch_size": 16},
                        client_id="client-0", progress=False).fit(x, np.repeat([0, 1], 16))
    return m.to_bytes()


def manifest_of(module_bytes, cid, key=None) -> dict:
    """The module's manifest as site `cid` sends it, signed with `key` (a private key path) or not."""
    manifest = {**module_bytes[1], "client_id": cid}
    return sign_manifest(manifest, key) if key else manifest


def roster(folder, keys, listed: dict) -> str:
    """A roster for sites client-0.. with classes a and b; listed: client id -> key name ("a", "b") or None."""
    root, pairs = keys
    text = ""
    for cid, key in listed.items():
        text += f'[sites.{cid}]\nclasses = {{ "a" = 100, "b" = 100 }}\n'
        if key:
            shutil.copy(pairs[key][1], folder / f"{key}.pub")
            text += f'public_key = "{key}.pub"\n'
    (folder / "roster.toml").write_text(text)
    return str(folder / "roster.toml")


def flip(value: str) -> str:
    """A base64 signature with one bit of its last byte changed: still base64, no longer the signature."""
    raw = bytearray(base64.b64decode(value))
    raw[-1] ^= 1
    return base64.b64encode(bytes(raw)).decode()


def test_any_change_to_a_signed_manifest_and_any_other_key_is_refused(keys, module_bytes):
    _, pairs = keys
    (a, a_pub), (b, _) = pairs["a"], pairs["b"]
    signed = manifest_of(module_bytes, "client-0", a)
    site_key = a_pub.read_text()
    verify_manifest(json.loads(json.dumps(signed)), site_key)  # as written to manifest.json and read back
    assert signed["signature"]["algorithm"] == "ecdsa-p384-sha384"
    sig = signed["signature"]
    cases = {
        "bad signature": [{**signed, "signature": {**sig, "value": flip(sig["value"])}},
                          {**signed, "counts": [1000, 1000]}, {**signed, "classes": [0, 1, 2]},
                          {**signed, "weights_sha256": "0" * 64}, {**signed, "client_id": "client-1"},
                          {**signed, "extra": 1},
                          # signed by b, the block claiming a's key: checked against the roster's key, never its own
                          {**manifest_of(module_bytes, "client-0", b),
                           "signature": {**manifest_of(module_bytes, "client-0", b)["signature"], "public_key": site_key}}],
        "signed by another key": [manifest_of(module_bytes, "client-0", b)],
        "unsigned": [manifest_of(module_bytes, "client-0")],
        "unsupported signature algorithm": [{**signed, "signature": {**sig, "algorithm": "ssh-rsa"}}],
        "malformed signature block": [{**signed, "signature": [1]}, {**signed, "signature": {**sig, "value": 7}},
                                      {**signed, "signature": {**sig, "value": "A" * 10_000}},
                                      {**signed, "signature": {**sig, "value": "not base64!"}}],
    }
    for why, manifests in cases.items():
        for m in manifests:
            with pytest.raises(FedFactoryError, match=why):
                verify_manifest(m, site_key)


def test_server_build_checks_signatures_against_the_roster(keys, module_bytes, tmp_path):
    """The files route: refused with the site named, before the run folder exists."""
    (a, _), (b, _) = keys[1]["a"], keys[1]["b"]
    blob = module_bytes[0]
    cfg = load_config(None, SERVER + [f"federation.roster='{roster(tmp_path, keys, {'client-0': 'a'})}'"])
    tampered = manifest_of(module_bytes, "client-0", a)
    tampered["signature"]["value"] = flip(tampered["signature"]["value"])
    edited = {**manifest_of(module_bytes, "client-0", a), "counts": [20, 20]}  # within the agreement: only the signature
    for name, manifest, why in (("tampered", tampered, "bad signature"), ("other-key", manifest_of(module_bytes, "client-0", b),
                                "signed by another key"), ("edited", edited, "bad signature"),
                                ("unsigned", manifest_of(module_bytes, "client-0"), "unsigned")):
        write_module_dir(tmp_path / name / "client-0", blob, manifest)
        with pytest.raises(FedFactoryError, match=f"site 'client-0': module refused, {why}"):
            server_build(cfg, [str(tmp_path / name / "client-0")], "none", tmp_path / f"run-{name}")
        assert not (tmp_path / f"run-{name}").exists()


def test_the_server_app_checks_signatures_by_node(keys, module_bytes, tmp_path):
    """Over Flower: a signed module is kept with its signature; an unsigned one where the roster lists a key,
    one signed by another site's key or tampered is refused by node id; unsigned with no key listed is accepted."""
    (a, _), (b, _) = keys[1]["a"], keys[1]["b"]
    blob = module_bytes[0]
    agreement = load_roster(roster(tmp_path, keys, {"client-0": "a", "client-1": "b", "client-2": "a", "client-3": None,
                                                    "client-4": "a"}), ["a", "b"])
    tampered = manifest_of(module_bytes, "client-4", a)
    tampered["signature"]["value"] = flip(tampered["signature"]["value"])
    replies = {1: module_content(blob, manifest_of(module_bytes, "client-0", a)),
               2: module_content(blob, manifest_of(module_bytes, "client-1", a)),   # another site's key
               3: module_content(blob, manifest_of(module_bytes, "client-2")),      # unsigned, a key is listed
               4: module_content(blob, manifest_of(module_bytes, "client-3")),      # unsigned, no key listed
               5: module_content(blob, tampered)}
    cfg = load_config(None, ["privacy.holdout=0"])
    out = tmp_path / "run"
    _, owners, failures = collect_modules(FakeGrid(replies), [1, 2, 3, 4, 5], cfg, out, 5,
                                          Limits(image_shape=(8, 8, 1), num_classes=2), agreement=agreement)
    assert owners == {"client-0": 1, "client-3": 4}
    assert "site 'client-1': module refused, signed by another key" in failures[2]
    assert "module refused, unsigned" in failures[3] and "module refused, bad signature" in failures[5]
    kept = json.loads((out / "modules/client-0/manifest.json").read_text())  # staged and moved: signature intact
    verify_manifest(kept, agreement["client-0"].public_key)


def hand_run(tmp_path, module_bytes, key=None, roster_path="") -> str:
    """A run folder as the server leaves it (modules, registry, audit log, config), without the factory."""
    run = tmp_path / "run"
    for cid in ("client-0", "client-1", "client-2"):
        manifest = manifest_of(module_bytes, cid, key if cid == "client-0" else None)
        write_module_dir(run / "modules" / cid, module_bytes[0], manifest)
        register(run, manifest)
    append_audit(run, "remove", client="client-2", sha256="0" * 64, reason="test")
    (run / "config.toml").write_text(dumps(load_config(None, [f"federation.roster='{roster_path}'"])))
    return str(run)


def lines_of(run) -> list[str]:
    return Path(run, "audit.jsonl").read_text().splitlines(keepends=True)


def test_verify_reports_an_edited_removed_or_reordered_audit_line(module_bytes, tmp_path, capsys):
    run = hand_run(tmp_path, module_bytes)
    good = lines_of(run)
    assert len(good) == 4 and json.loads(good[0])["prev"] == "0" * 64
    assert main(["verify", run]) == 0
    out = capsys.readouterr().out
    assert "3 of 3 modules verified" in out and "audit log: 4 chained lines" in out and "signatures: not checked" in out
    assert f"head (SHA-256 of the last) {hashlib.sha256(good[-1].encode()).hexdigest()}" in out  # to keep elsewhere

    edited = good[:1] + [good[1].replace('"client-1"', '"client-9"')] + good[2:]
    for broken, where in ((edited, "line 3 does not follow line 2"), (good[:1] + good[2:], "line 2 does not follow line 1"),
                          ([good[0], good[2], good[1], good[3]], "line 2 does not follow line 1"),
                          (good[1:], "line 1 is not the first line written")):
        (tmp_path / "run/audit.jsonl").write_text("".join(broken))
        assert main(["verify", run]) == 1
        assert where in capsys.readouterr().out

    # a log from before chaining reads as not chained, not as broken; a copy (as unlearn makes) chains on
    (tmp_path / "run/audit.jsonl").write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "prev"})
                                                      + "\n" for line in good))
    assert main(["verify", run]) == 0 and "not chained" in capsys.readouterr().out
    (tmp_path / "run/audit.jsonl").write_text("".join(good))
    append_audit(tmp_path / "run", "remove", client="client-1", sha256="1" * 64)
    problems, summary = verify_audit(tmp_path / "run")
    assert not problems and "5 chained lines" in summary


def test_verify_rechecks_signatures_against_the_runs_roster(keys, module_bytes, tmp_path, capsys):
    a, _ = keys[1]["a"]
    (tmp_path / "consortium").mkdir()
    listed = roster(tmp_path / "consortium", keys, {"client-0": "a", "client-1": None, "client-2": None})
    run = hand_run(tmp_path, module_bytes, a, listed)
    assert main(["verify", run]) == 0 and "signatures: 1 of 1 verified" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "run/modules/client-0/manifest.json").read_text())
    (tmp_path / "run/modules/client-0/manifest.json").write_text(json.dumps({**manifest, "counts": [99, 99]}))
    assert main(["verify", run]) == 1  # the weights still hash right: only the signature tells
    out = capsys.readouterr().out
    assert "3 of 3 modules verified" in out and "MISMATCH client-0: site 'client-0': module refused, bad signature" in out
    shutil.rmtree(tmp_path / "consortium")
    assert main(["verify", run]) == 0
    assert f"signatures: not checked (roster {listed} not found" in capsys.readouterr().out


@pytest.mark.slow
def test_a_site_signs_with_sign_key_and_the_server_builds_and_verifies(keys, tmp_path, capsys):
    """The whole files route: site train --sign-key, server build against a roster with the site's key,
    fedfactory verify on the run."""

    a, _ = keys[1]["a"]
    x = np.random.default_rng(1).integers(0, 255, (32, 8, 8, 1), dtype=np.uint8)
    write_image_folder(tmp_path / "site", x, np.repeat([0, 1], 16), ["a", "b"])
    flags = sum((["--set", s] for s in SERVER + ["module.channels=8", "module.channel_mult=[1, 2]", "module.num_blocks=1",
                                                  "module.budget_images=64", "module.batch_size=16",
                                                  "module.sample_steps=3"]), [])
    (tmp_path / "consortium.toml").write_text("")
    config = ["--config", str(tmp_path / "consortium.toml")]
    assert main(["site", "train", *config, "--data", str(tmp_path / "site"), "--out", str(tmp_path / "client-0"),
                 "--sign-key", str(a), *flags]) == 0
    assert "signed with SHA256:" in capsys.readouterr().out
    listed = roster(tmp_path, keys, {"client-0": "a"})
    assert main(["server", "build", *config, "--modules", str(tmp_path / "client-0"), "--out", str(tmp_path / "run"),
                 *flags, "--set", f"federation.roster='{listed}'"]) == 0
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "signatures: 1 of 1 verified" in out and "audit log: 1 chained line;" in out
    assert main(["site", "train", *config, "--data", str(tmp_path / "site"), "--out", str(tmp_path / "x"),
                 "--sign-key", str(tmp_path / "no-such-key"), *flags]) == 2
    assert "cannot read signing key" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_the_client_app_signs_with_its_node_config_sign_key(keys, tmp_path):
    """node config sign-key: the module sent and the copy kept carry one signature, by the site's key."""
    from flwr.app import Context, Message, RecordDict

    from fedfactory.runners.flower import client_app
    from fedfactory.runners.flower.messages import config_content, read_module

    a, a_pub = keys[1]["a"]
    x = np.random.default_rng(2).integers(0, 255, (16, 8, 8, 1), dtype=np.uint8)
    write_image_folder(tmp_path / "hospital-a", x, np.repeat([0, 1], 8), ["a", "b"])
    cfg = load_config(None, SERVER + ["module.channels=8", "module.channel_mult=[1, 2]", "module.num_blocks=1",
                                      "module.budget_images=32", "module.batch_size=16"])
    node = {"data": str(tmp_path / "hospital-a"), "sign-key": str(a), "keep-dir": str(tmp_path / "kept")}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    reply = client_app.train(Message(config_content(dumps(cfg), "module"), dst_node_id=1, message_type="train"), context)
    blob, manifest = read_module(reply.content)
    verify_manifest(manifest, a_pub.read_text())
    assert json.loads((tmp_path / "kept/hospital-a/manifest.json").read_text()) == manifest
    assert (tmp_path / "kept/hospital-a/module.safetensors").read_bytes() == blob
    context = Context(run_id=1, node_id=1, node_config={**node, "sign-key": str(tmp_path / "a.pub")}, state=RecordDict(),
                      run_config={})
    shutil.copy(a_pub, tmp_path / "a.pub")
    with pytest.raises(FedFactoryError, match="not an OpenSSH private key"):  # before any training
        client_app.train(Message(config_content(dumps(cfg), "module"), dst_node_id=1, message_type="train"), context)
