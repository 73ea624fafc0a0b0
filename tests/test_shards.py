"""Kept synthetic shards (factory.ShardStore): reused bit for bit, refused when anything is off."""

import hashlib
import json

import numpy as np
import pytest
import torch

from fedfactory.config import load_config
from fedfactory.factory import ShardStore, plan, shard_keys, synthesize
from fedfactory.modules import load_module
from fedfactory.modules.diffusion import DiffusionModule
from fedfactory.server import shard_store

TINY_ARCH = {"channels": 8, "channel_mult": [1, 2], "num_blocks": 1}
TINY_TRAIN = {"budget_images": 64, "batch_size": 16, "sample_steps": 3}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two saved tiny modules: a covers classes 0 and 1, b covers 1 and 2 (class 1 is shared)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("mods")
    for cid, classes in (("a", [0, 1]), ("b", [1, 2])):
        x = rng.integers(0, 256, (24, 8, 8, 1), dtype=np.uint8)
        DiffusionModule(TINY_ARCH, TINY_TRAIN, client_id=cid, progress=False).fit(x, np.resize(classes, 24)).save(root / cid)
    return root


@pytest.fixture
def mods(saved):
    return [load_module(saved / cid, device="cpu") for cid in ("a", "b")]


def _synth(mods, folder=None, per_class=30, seed=5):
    return synthesize(mods, 3, per_class, seed, store=ShardStore(folder) if folder else None, progress=False)


def _reused(s):
    return [d["reused"] for d in s.sources]


def test_reuse_gives_the_same_bits_without_sampling(mods, tmp_path, monkeypatch):
    plain = _synth(mods)
    first = _synth(mods, tmp_path)
    assert _reused(first) == [False] * 4 and first.digest() == plain.digest()
    index = json.loads((tmp_path / "index.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{k}.npy" for k in index] + ["index.json"])
    assert {(e["client"], e["class"], e["n"]) for e in index.values()} == {("a", 0, 30), ("a", 1, 15), ("b", 1, 15), ("b", 2, 30)}
    for m in mods:
        monkeypatch.setattr(m, "sample", lambda *a, **k: pytest.fail("a kept draw was sampled again"))
    again = _synth(mods, tmp_path)
    assert _reused(again) == [True] * 4 and again.digest() == plain.digest()
    assert np.array_equal(again.labels, plain.labels)


def _tamper(folder, how):
    index = json.loads((folder / "index.json").read_text())
    key = next(k for k, e in index.items() if e["client"] == "b" and e["class"] == 2)
    path = folder / f"{key}.npy"
    if how == "bytes":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
    elif how == "index hash":
        index[key]["sha256"] = "0" * 64
    elif how in ("shape", "dtype"):  # an array the index vouches for, of the wrong kind
        x = np.zeros((29, 8, 8, 1), np.uint8) if how == "shape" else np.zeros((30, 8, 8, 1), np.int16)
        np.save(path, x)
        index[key]["sha256"] = hashlib.sha256(x.tobytes()).hexdigest()
    elif how == "pickle":
        np.save(path, np.array([object()] * 3), allow_pickle=True)
    elif how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:70])
    (folder / "index.json").write_text(json.dumps(index))
    return path


@pytest.mark.parametrize("how", ["bytes", "index hash", "shape", "dtype", "pickle", "missing", "truncated"])
def test_a_tampered_shard_is_sampled_again(mods, tmp_path, capsys, how):
    ref = _synth(mods, tmp_path)
    path = _tamper(tmp_path, how)
    capsys.readouterr()
    again = _synth(mods, tmp_path)
    assert again.digest() == ref.digest()
    assert _reused(again) == [True, True, True, False]  # only (b, class 2) was drawn again
    out = capsys.readouterr().out
    assert out.count("fedfactory: ") == 1 and "did not verify" in out and "b class 2" in out
    assert np.array_equal(np.load(path), ref.images[ref.labels == 2])  # overwritten with the right draw
    assert _reused(_synth(mods, tmp_path)) == [True] * 4


def test_an_unreadable_index_means_sampling_everything_again(mods, tmp_path, capsys):
    ref = _synth(mods, tmp_path)
    (tmp_path / "index.json").write_text("[1, 2")
    capsys.readouterr()
    again = _synth(mods, tmp_path)
    assert _reused(again) == [False] * 4 and again.digest() == ref.digest()
    assert "fedfactory: " in capsys.readouterr().out and len(json.loads((tmp_path / "index.json").read_text())) == 4


def test_a_changed_sampler_seed_or_size_misses(mods, saved, tmp_path):
    ref = _synth(mods, tmp_path)
    assert _reused(_synth(mods, tmp_path, seed=6)) == [False] * 4
    assert _reused(_synth(mods, tmp_path, per_class=20)) == [False] * 4
    for key, value in (("sample_steps", 2), ("sigma_min", 0.5), ("guidance", 2.0)):
        changed = load_module(saved / "a", device="cpu")
        changed.train_cfg[key] = value  # the same weights and saved manifest, another sampler
        s = _synth([changed, mods[1]], tmp_path)
        assert _reused(s) == [False, False, True, True], key
        if key == "sample_steps":  # (a barely trained toy saturates: not every setting shows in its pixels)
            assert not np.array_equal(s.images[s.labels == 0], ref.images[ref.labels == 0])
    other_bf16 = load_module(saved / "a", device="cpu", bf16="off" if mods[0].bf16 else "on")
    assert _reused(_synth([other_bf16, mods[1]], tmp_path))[:2] == [False, False]
    # an unsaved module is keyed by its weights' hash too
    unsaved = load_module(saved / "a", device="cpu")
    del unsaved.saved_manifest
    assert shard_keys([unsaved], {0: [("a", 30)]}, 5) == shard_keys([mods[0]], {0: [("a", 30)]}, 5)
    with torch.no_grad():
        next(unsaved.net.parameters()).add_(1.0)
    assert shard_keys([unsaved], {0: [("a", 30)]}, 5) != shard_keys([mods[0]], {0: [("a", 30)]}, 5)


def test_a_hostile_index_entry_is_never_a_path(mods, tmp_path):
    store = tmp_path / "run" / "synthetic"
    ref = _synth(mods, store)
    index = json.loads((store / "index.json").read_text())
    own = set(index)
    bait = tmp_path / "bait.npy"
    np.save(bait, ref.images[:30])
    for evil in ("../../bait", "../bait.npy", str(bait.with_suffix("")), "/etc/passwd", "a" * 63 + "/"):
        index[evil] = {"client": "a", "class": 0, "n": 30, "seed": 1, "shape": [30, 8, 8, 1], "sha256": "0" * 64}
    (store / "index.json").write_text(json.dumps(index))
    loaded = ShardStore(store)
    assert set(loaded.index) == own
    again = _synth(mods, store)
    assert _reused(again) == [True] * 4 and again.digest() == ref.digest()
    # adopting copies only the keys asked for, whatever else the source's index lists
    target = ShardStore(tmp_path / "new" / "synthetic")
    draws, _ = plan([mods[0]], 3, 30)
    copied = target.adopt(loaded, list(shard_keys([mods[0]], draws, 5).values()) + sorted(set(index) - own))
    assert len(copied) == 1  # (a, class 0); a's class 1 is now 30 images, a new draw, and b's draws are not asked for
    assert sorted(p.name for p in (tmp_path / "new" / "synthetic").iterdir()) == [f"{copied[0]}.npy", "index.json"]
    assert bait.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bait.npy", "new", "run"]


def test_keep_shards_can_be_turned_off(tmp_path):
    assert shard_store(load_config(), tmp_path) is not None and shard_store(load_config(), None) is None
    assert shard_store(load_config(overrides=["factory.keep_shards=false"]), tmp_path) is None
