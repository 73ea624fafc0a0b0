"""Bad input gets one clear line on stderr and exit code 2, never a traceback."""

import subprocess
import sys

import numpy as np

from helpers import needs_fashion


def fedfactory(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fedfactory.cli", *args], capture_output=True, text=True, cwd=cwd)


def _npz(path, **overrides):
    arrays = {"x_train": np.zeros((20, 8, 8), np.uint8), "y_train": np.arange(20) % 4,
              "x_test": np.zeros((4, 8, 8), np.uint8), "y_test": np.arange(4) % 4}
    arrays.update(overrides)
    np.savez(path, **arrays)
    return f"npz:{path}"


def _cases(tmp_path):
    (tmp_path / "corrupt.npz").write_bytes(b"garbage")
    return [
        (["partition", "mnist-fashion"], "unknown data set"),
        (["partition", f"npz:{tmp_path / 'missing.npz'}"], "not found"),
        (["partition", "npz:" + str(tmp_path / "corrupt.npz")], "not a readable .npz"),
        (["partition", _npz(tmp_path / "shape.npz", x_train=np.zeros((20, 64), np.uint8))], "N x H x W"),
        (["partition", _npz(tmp_path / "range.npz", y_train=np.arange(20) % 4 - 1)], "out of range"),
        (["partition", _npz(tmp_path / "ok.npz"), "--scheme", "silos", "--clients", "5"], "only 4 classes"),
        (["partition", _npz(tmp_path / "ok2.npz"), "--scheme", "dirichlet:0", "--clients", "2"], "alpha must be > 0"),
        (["partition", _npz(tmp_path / "ok3.npz"), "--scheme", "iid", "--clients", "30"], "empty"),
        (["run", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "r")], "not found"),
    ]


def test_bad_inputs_one_line_exit_2(tmp_path):
    for args, msg in _cases(tmp_path):
        r = fedfactory(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("fedfactory: error:") and msg in lines[0], (args, r.stderr)


def test_unknown_config_key_names_nearest(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[module]\nbudget_image = 3\n")
    r = fedfactory("run", str(cfg), "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "module.budget_image" in r.stderr and "module.budget_images" in r.stderr
    r = fedfactory("run", "configs/fashion-silos.toml", "--out", str(tmp_path / "r"), "--set", "partition.clientz=3")
    assert r.returncode == 2 and "partition.clients" in r.stderr


def test_partition_prints_table(tmp_path):
    r = fedfactory("partition", _npz(tmp_path / "d.npz"), "--scheme", "silos", "--clients", "4")
    assert r.returncode == 0, r.stderr
    rows = [l.split() for l in r.stdout.splitlines() if l.startswith("client-")]
    assert [row[1:5] for row in rows] == [["5", "0", "0", "0"], ["0", "5", "0", "0"], ["0", "0", "5", "0"], ["0", "0", "0", "5"]]


@needs_fashion
def test_fashion_silos_table():
    r = fedfactory("partition", "fashion-mnist", "--scheme", "silos", "--clients", "10")
    assert r.returncode == 0, r.stderr
    rows = [l.split() for l in r.stdout.splitlines() if l.startswith("client-")]
    assert len(rows) == 10
    for i, row in enumerate(rows):
        counts = [int(v) for v in row[1:11]]
        assert counts[i] == 6000 and sum(counts) == 6000 and int(row[-1]) == 6000


def test_datasets_lists_every_format():
    r = fedfactory("datasets")
    assert r.returncode == 0
    for name in ("fashion-mnist", "br35h", "medmnist", "cifar10", "isic2019", "npz"):
        assert name in r.stdout
