"""A site that lies, at toy size: its module is honest in format, trained on one class filed under every
class folder, and its manifest claims 5,000,000 images of each. Judged by what it does to the result."""

import json
import shutil

import numpy as np
import pytest

from fedfactory.cli import main
from fedfactory.config import load_config
from fedfactory.runners.embedded import prepare_data, run
from helpers import toy_overrides, write_image_folder

pytestmark = pytest.mark.slow
NAMES = ["class 0", "class 1", "class 2", "class 3"]


@pytest.fixture(scope="module")
def federation(digits_npz, tmp_path_factory):
    """Four honest single-class modules, the liar's module, and the consortium's --set flags."""
    root = tmp_path_factory.mktemp("liar")
    sets = toy_overrides(digits_npz) + ["quality.reference_budget=0", "runtime.threads=1"]
    cfg = load_config(None, sets)
    run(cfg, root / "honest")
    ds, part = prepare_data(cfg)
    zeros = ds.x_train[part.indices["client-0"]]
    for c, name in enumerate(NAMES):  # the liar's folder: the same images of class 0 under every class
        write_image_folder(root / "lies" / str(c), zeros, np.full(len(zeros), c), NAMES)
        shutil.move(root / "lies" / str(c) / name, root / "liar-data" / name)
    flags = sum((["--set", s] for s in sets + [f"data.classes={NAMES}", "data.size=8", "data.channels=1"]), [])
    (root / "consortium.toml").write_text("")
    assert main(["site", "train", "--config", str(root / "consortium.toml"), "--data", str(root / "liar-data"),
                 "--out", str(root / "liar"), *flags]) == 0
    manifest = json.loads((root / "liar/manifest.json").read_text())
    (root / "liar/manifest.json").write_text(json.dumps({**manifest, "counts": [5_000_000] * 4}))
    return root, flags + ["--test", f"npz:{digits_npz}"]


def build(federation, name, *extra, liar=True):
    root, flags = federation
    modules = [str(root / "honest/modules" / f"client-{i}") for i in range(4)] + ([str(root / "liar")] if liar else [])
    rc = main(["server", "build", "--config", str(root / "consortium.toml"), "--modules", *modules,
               "--out", str(root / name), *flags, *sum((["--set", e] for e in extra), [])])
    return rc, (json.loads((root / name / "results.json").read_text()) if rc == 0 else None)


def liar_share(results) -> list[float]:
    per_class = results["synthetic"]["per_class"]
    return [sum(s["n"] for s in results["synthetic"]["sources"] if s["client"] == "liar" and s["class"] == c) / per_class[c]
            for c in range(4)]


def test_undefended_the_liar_takes_every_class(federation):
    _, honest = build(federation, "honest-only", liar=False)
    _, taken = build(federation, "undefended", "factory.check_samples=0")
    assert min(liar_share(taken)) > 0.95  # its claimed counts buy it almost every image of every class
    assert taken["metrics"]["accuracy"] < honest["metrics"]["accuracy"] - 0.15
    assert "decide the mix" in (federation[0] / "undefended/report.md").read_text()


def test_the_roster_refuses_the_liar(federation, capsys):
    root, _ = federation
    (root / "roster.toml").write_text("".join(f'[sites.client-{c}]\nclasses = {{ "{n}" = 1000 }}\n'
                                              for c, n in enumerate(NAMES)) + '[sites.liar]\nclasses = { "class 0" = 1000 }\n')
    rc, _ = build(federation, "agreed", f"federation.roster='{root / 'roster.toml'}'")
    err = capsys.readouterr().err
    assert rc == 2 and "site 'liar'" in err and "agreement" in err and not (root / "agreed").exists()


def test_a_share_cap_bounds_the_liar(federation):
    _, capped = build(federation, "capped", "factory.check_samples=0", "factory.max_share=0.5")
    assert max(liar_share(capped)) <= 0.5


def test_the_sites_that_know_the_class_catch_the_liar(federation):
    """It is flagged on every class an honest module also covers, and dropped: the federation then makes
    exactly what the honest modules alone make."""
    _, honest = build(federation, "honest-only-2", liar=False)
    _, checked = build(federation, "checked", "factory.outliers='drop'")
    report = checked["crosscheck"]
    assert report["flagged"] == {"liar": [1, 2, 3]} and report["untrusted"] == ["liar"]
    assert sorted(map(tuple, report["dropped"])) == [("liar", c) for c in range(4)]
    assert checked["synthetic"]["sha256"] == honest["synthetic"]["sha256"]
    assert checked["metrics"] == honest["metrics"]
    assert "liar" in (federation[0] / "checked/report.md").read_text()
    _, flagged_only = build(federation, "flag-only")  # the default only reports
    assert flagged_only["crosscheck"]["untrusted"] == ["liar"] and min(liar_share(flagged_only)) > 0.95


def test_a_module_without_its_audit_is_refused(federation, tmp_path, capsys):
    root, flags = federation
    shutil.copytree(root / "honest/modules/client-1", tmp_path / "client-1")
    manifest = json.loads((tmp_path / "client-1/manifest.json").read_text())
    del manifest["privacy"]
    (tmp_path / "client-1/manifest.json").write_text(json.dumps(manifest))
    rc = main(["server", "build", "--config", str(root / "consortium.toml"), "--modules", str(tmp_path / "client-1"),
               "--out", str(tmp_path / "run"), *flags])
    assert rc == 2 and "client-1 carries no privacy audit" in capsys.readouterr().err


@pytest.mark.parametrize("shares, cap, expected", [([0.9, 0.1], 0.5, [0.5, 0.5]), ([0.7, 0.2, 0.1], 0.5, [0.5, 1 / 3, 1 / 6]),
                                                  ([1.0], 0.3, [1.0]), ([0.6, 0.4], 1.0, [0.6, 0.4])])
def test_capped_shares_hand_the_excess_to_the_others(shares, cap, expected):
    from fedfactory.factory import capped_shares

    assert np.allclose(capped_shares(np.array(shares), cap), expected)
