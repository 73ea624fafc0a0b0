"""Start a whole Flower federation on this machine: a SuperLink, N SuperNodes on loopback, the
run, its status, and the shutdown of every process started (by process group).

`flwr run` exits 0 even when the ServerApp fails, so the outcome is read from
`flwr list --run-id ID --format json`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ...errors import FedFactoryError
from ...server import check_new_run_dir

APP_DIR = Path(__file__).parent / "app"


# Flower's tools from the environment that runs fedfactory (a virtual environment need not be activated).
BIN = str(Path(sys.executable).parent)


def flower_tools_missing() -> list[str]:
    path = os.pathsep.join([BIN, os.environ.get("PATH", "")])
    return [c for c in ("flower-superlink", "flower-supernode", "flwr") if shutil.which(c, path=path) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


class LocalFederation:
    """Context manager: processes are stopped however the block ends."""

    def __init__(self, num_nodes: int, node_configs: list[dict] | None = None, workdir: str | Path | None = None):
        if num_nodes < 1:
            raise FedFactoryError(f"a federation needs at least one node, got {num_nodes}")
        self.num_nodes = num_nodes
        self.node_configs = node_configs or [{} for _ in range(num_nodes)]
        self.work = Path(workdir or tempfile.mkdtemp(prefix="fedfactory-flower-"))
        self.procs: list[subprocess.Popen] = []
        self.port = _free_port()
        self.env = {**os.environ, "FLWR_HOME": str(self.work / "flwr-home"),
                    "PATH": os.pathsep.join([BIN, os.environ.get("PATH", "")])}

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.work / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def __enter__(self):
        missing = flower_tools_missing()
        if missing:
            raise FedFactoryError(f"Flower's command-line tools are not installed here ({', '.join(missing)} not on "
                                  "PATH): install fedfactory with `bash scripts/setup.sh`, or `pip install 'flwr>=1.42,<1.43'`")
        home = self.work / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self._start("superlink", ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                                  "--host", "127.0.0.1", "--port", str(self.port)])
        time.sleep(2.0)
        for i in range(self.num_nodes):
            own = self.node_configs[i]  # a site with its own data is not a share of a public data set
            cfg = own if "data" in own else {"partition-id": i, "num-partitions": self.num_nodes, **own}
            node_config = " ".join(f"{k}={_toml_str(v) if isinstance(v, str) else v}" for k, v in cfg.items())
            self._start(f"supernode-{i}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                                           "--port", str(_free_port()), "--node-config", node_config])
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def _flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], capture_output=True, text=True, env=self.env, timeout=timeout)

    def run(self, run_config: dict, timeout: float = 3600) -> dict:
        """Submit the app, wait for the run to finish; returns {'run_id', 'status', 'log'}."""
        cfg = " ".join(f"{k}={_toml_str(v) if isinstance(v, str) else v}" for k, v in run_config.items())
        r = self._flwr("run", str(APP_DIR), "local", "--run-config", cfg, "--format", "json")
        try:
            run_id = int(json.loads(r.stdout)["run-id"])
        except (ValueError, KeyError, TypeError):
            raise FedFactoryError(f"flwr run failed: {(r.stdout + r.stderr).strip()[-2000:]}") from None
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            r = self._flwr("list", "local", "--run-id", str(run_id), "--format", "json")
            try:
                status = json.loads(r.stdout)["runs"][0]["status"]
            except (ValueError, KeyError, IndexError, TypeError):
                status = ""
            if status.startswith("finished"):
                break
            time.sleep(2.0)
        else:
            status = f"timed out after {timeout:.0f} s (last status {status!r})"
        log = self._flwr("log", str(run_id), "local", "--show", timeout=30)
        return {"run_id": run_id, "status": status, "log": log.stdout + log.stderr}


def federate(config: str | Path, num_nodes: int, out: str | Path, overrides: list[str] = (),
             node_configs: list[dict] | None = None, timeout: float = 3600, wait_timeout: float = 120,
             test: str = "") -> dict:
    """Run the one-shot federation over Flower on this machine; raises if the run did not complete.

    node_configs: one dict per node, over the default simulated site (partition-id i); a node with
    {"data": folder} is a site with its own data. test: the server's test set (see server.load_test_set).
    """
    out = Path(out).resolve()
    check_new_run_dir(out)
    for o in overrides:
        if ";" in o:
            raise FedFactoryError(f"--set values may not contain ';': {o!r}")
    test = str(Path(test).resolve()) if test and Path(test).exists() else test
    with LocalFederation(num_nodes, node_configs) as fed:
        result = fed.run({"config": str(Path(config).resolve()), "overrides": ";".join(overrides), "out": str(out),
                          "test": test, "num-nodes": num_nodes, "wait-timeout": float(wait_timeout),
                          "train-timeout": float(timeout)},
                         timeout=timeout + wait_timeout + 60)
    result["workdir"] = str(fed.work)
    if result["status"] != "finished:completed":
        reasons = [l.split("fedfactory: ", 1)[1] for l in result["log"].splitlines()
                   if "fedfactory: node" in l or "fedfactory: error" in l]
        raise FedFactoryError(f"Flower run {result['run_id']} ended {result['status']}"
                              + (f": {'; '.join(reasons)}" if reasons else "") + f" (logs in {fed.work})")
    return result
