"""Faults on one machine: a run killed mid-way and resumed, a full disk, a read-only run folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedfactory.cli import main
from fedfactory.config import load_config
from fedfactory.modules import load_module
from fedfactory.runners.embedded import run
from helpers import toy_overrides

pytestmark = pytest.mark.slow


def _cli(*args):
    return subprocess.Popen([sys.executable, "-m", "fedfactory.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def test_a_killed_run_resumes_to_the_uninterrupted_result(digits_npz, tmp_path):
    overrides = toy_overrides(digits_npz) + ["runtime.threads=1"]  # bits depend on the thread count
    killed = tmp_path / "killed"
    proc = _cli("run", "configs/fashion-silos.toml", "--out", str(killed), *_sets(overrides))
    deadline = time.monotonic() + 300
    while not (killed / "modules/client-1/manifest.json").exists():  # two modules done: kill it, hard
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists()
    kept = {p.name for p in (killed / "modules").iterdir() if not p.name.startswith(".")}
    assert {"client-0", "client-1"} <= kept

    assert main(["run", "configs/fashion-silos.toml", "--out", str(killed), "--resume", *_sets(overrides)]) == 0
    whole = run(load_config("configs/fashion-silos.toml", overrides), tmp_path / "whole")
    resumed = json.loads((killed / "results.json").read_text())
    assert resumed["metrics"] == whole["metrics"]
    assert resumed["synthetic"]["sha256"] == whole["synthetic"]["sha256"]
    assert [m["sha256"] for m in resumed["modules"]] == [m["sha256"] for m in whole["modules"]]
    assert (killed / "classifiers/server.safetensors").read_bytes() == \
        (tmp_path / "whole/classifiers/server.safetensors").read_bytes()
    adds = [json.loads(l)["client"] for l in (killed / "audit.jsonl").read_text().splitlines()]
    assert adds.count("client-0") == 1  # the finished modules were reused, not retrained
    assert not [p for p in killed.rglob("*.tmp")]


@pytest.fixture
def small_disk(tmp_path):
    """A real 192 KiB file system (tmpfs): enough for the config and a few modules, not for a whole run."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_a_clear_error_and_leaves_only_whole_files(digits_npz, small_disk):
    out = small_disk / "run"
    proc = _cli("run", "configs/fashion-silos.toml", "--out", str(out), *_sets(toy_overrides(digits_npz)))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("fedfactory:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "--resume" in lines[0], err
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no half-written file or folder
    for folder in (out / "modules").iterdir():  # every module that is there verifies
        load_module(folder, device="cpu")
    json.loads((out / "registry.json").read_text())


def test_a_read_only_run_folder_is_a_clear_error(digits_npz, small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    proc = _cli("run", "configs/fashion-silos.toml", "--out", str(small_disk / "run"), *_sets(toy_overrides(digits_npz)))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (1, 2) and "Traceback" not in err, err
    assert "Read-only file system" in err and len(err.strip().splitlines()) == 1, err


def _alive(pid: int) -> bool:
    try:
        return " Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]  # a zombie is dead
    except FileNotFoundError:
        return False


def test_a_killed_run_leaves_no_worker_training_on(tmp_path):
    """A site's worker process ends when the run that started it dies, instead of training on as an
    orphan (found in use: two orphans of a killed run kept both cores busy and wrote into its folder)."""
    script = """
import os, sys, time, multiprocessing
from concurrent.futures import ProcessPoolExecutor
from fedfactory.runners.embedded import _exit_with_parent
pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                           initializer=_exit_with_parent if sys.argv[1] == "watched" else None, initargs=(os.getpid(),))
print(pool.submit(os.getpid).result(), flush=True)
pool.submit(time.sleep, 30)  # a long task, as a module's training
time.sleep(0.5)
os._exit(0)  # killed: no shutdown
"""
    pids = {}
    for mode in ("watched", "bare"):
        with open(tmp_path / mode, "w") as f:  # a file, not a pipe: an orphan would hold a pipe open
            subprocess.run([sys.executable, "-c", script, mode], stdout=f, stderr=subprocess.DEVNULL, timeout=120)
        pids[mode] = int((tmp_path / mode).read_text().split()[0])
    deadline = time.time() + 10
    while time.time() < deadline and _alive(pids["watched"]):
        time.sleep(0.2)
    assert not _alive(pids["watched"])
    assert _alive(pids["bare"])  # without the watch, the orphan goes on with its task
    os.kill(pids["bare"], 9)


def test_a_resumed_run_clears_the_temporary_files_a_kill_left(tmp_path):
    """A SIGKILL between an atomic write's temporary file and its rename leaves `.NAME.RANDOM.tmp`
    behind (a file, or a module's folder); the resumed run removes them and keeps every real file."""
    from fedfactory.server import start_run

    run_dir = tmp_path / "run"
    (run_dir / "site-audits/client-1").mkdir(parents=True)
    (run_dir / "site-audits/client-1/.closest_pairs.png.x1y2.tmp").write_bytes(b"half a picture")
    (run_dir / "modules/.client-0.a9b8.tmp").mkdir(parents=True)
    (run_dir / "modules/.client-0.a9b8.tmp/module.safetensors").write_bytes(b"half a module")
    (run_dir / "site-audits/client-1/audit.md").write_text("kept")
    start_run(load_config(None, []), run_dir, resume=True)
    assert not list(run_dir.rglob("*.tmp"))
    assert (run_dir / "site-audits/client-1/audit.md").read_text() == "kept" and (run_dir / "config.toml").exists()
