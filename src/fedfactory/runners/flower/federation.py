"""Start a whole Flower federation on this machine: a SuperLink, N SuperNodes on loopback, the
run, its status, and the shutdown of every process started (by process group).

`flwr run` exits 0 even when the ServerApp fails, so the outcome is read from
`flwr list --run-id ID --format json`.

With tls=True the SuperLink serves TLS with a certificate from a CA made for the occasion, and only
SuperNodes whose public keys were registered beforehand (`flwr supernode register`) may join.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ...data.partition import client_id
from ...errors import FedFactoryError
from ...runtime import threads_each
from ...server import check_new_run_dir
from .certs import write_node_keys, write_tls

APP_DIR = Path(__file__).parent / "app"
STATUS_EVERY = 5.0  # seconds between two `flwr list` calls while a run works


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


def _flwr_config(values: dict) -> str:
    """A --node-config / --run-config string: space-separated key=value, values in TOML."""
    def value(v):
        return _toml_str(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v
    return " ".join(f"{k}={value(v)}" for k, v in values.items())


def make_tls_material(folder: str | Path, num_nodes: int, hostnames=("localhost",), ips=("127.0.0.1",),
                      days: int = 30) -> dict:
    """A self-signed CA, a server certificate it signs for `hostnames` and `ips` (by default 127.0.0.1 and
    localhost: a federation on this machine), and one SuperNode key pair per node, as PEM files in `folder`.
    Returns {'ca', 'cert', 'key': Path, 'nodes': [(private, public)]}. Across hosts: `fedfactory certs`
    (certs.make_consortium), which never overwrites and makes a folder per site."""
    paths = write_tls(folder, hostnames, ips, days)
    return {**paths, "nodes": [write_node_keys(Path(folder) / f"supernode-{i}") for i in range(num_nodes)]}


class LocalFederation:
    """Context manager: processes are stopped however the block ends."""

    def __init__(self, num_nodes: int, node_configs: list[dict] | None = None, workdir: str | Path | None = None,
                 tls: bool = False, node_envs: list[dict] | None = None):
        if num_nodes < 1:
            raise FedFactoryError(f"a federation needs at least one node, got {num_nodes}")
        self.num_nodes = num_nodes
        self.node_configs = node_configs or [{} for _ in range(num_nodes)]
        # Extra environment, per node. The nodes share this machine's cores as the embedded runner's sites do
        # (runtime.site_split: cores // nodes threads each, at least one): a node left to torch's default takes
        # every core, and N such nodes on the same cores run several times slower. runtime.threads still wins.
        share = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(threads_each(num_nodes))}
        self.node_envs = [{**share, **e} for e in node_envs or [{}] * num_nodes]
        self.work = Path(workdir or tempfile.mkdtemp(prefix="fedfactory-flower-"))
        self.tls = tls
        self.certs: dict = {}  # with tls: make_tls_material's paths
        self.node_ids: list[int] = []  # with tls: the node id the SuperLink gave each registered key, by node
        self.procs: dict[str, subprocess.Popen] = {}  # by name: superlink, supernode-<i>, ...
        self.port = _free_port()
        self.env = {**os.environ, "FLWR_HOME": str(self.work / "flwr-home"),
                    "PATH": os.pathsep.join([BIN, os.environ.get("PATH", "")])}

    def _start(self, name: str, args: list[str], env: dict | None = None) -> None:
        with open(self.work / f"{name}.log", "a") as log:
            self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                                start_new_session=True)

    def stop(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop one process and everything it started (its process group): a crash, for the fault tests."""
        p = self.procs[name]
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        p.wait()

    def __enter__(self):
        missing = flower_tools_missing()
        if missing:
            raise FedFactoryError(f"Flower's command-line tools are not installed here ({', '.join(missing)} not on "
                                  "PATH): install fedfactory with `bash scripts/setup.sh`, or `pip install 'flwr>=1.42,<1.43'`")
        home = self.work / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        if self.tls:
            c = self.certs = make_tls_material(self.work / "certs", self.num_nodes)
            link_security = ["--ssl-ca-certfile", str(c["ca"]), "--ssl-certfile", str(c["cert"]),
                             "--ssl-keyfile", str(c["key"]), "--enable-supernode-auth"]
            connection = f"root-certificates = {_toml_str(str(c['ca']))}\n"  # flwr wants an absolute path
        else:
            link_security, connection = ["--insecure"], "insecure = true\n"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n{connection}')
        self._link_args = ["flower-superlink", *link_security, "--disable-runtime-dependency-installation",
                           "--host", "127.0.0.1", "--port", str(self.port)]
        self._start("superlink", self._link_args)
        time.sleep(2.0)
        configs = []
        for i in range(self.num_nodes):
            own = self.node_configs[i]  # a site with its own data is not a share of a public data set
            configs.append(own if "data" in own else {"partition-id": i, "num-partitions": self.num_nodes, **own})
        # With auth on, the SuperLink refuses self-registration: the coordinator registers each key, under
        # the client id the site may upload as (the ServerApp reads it back as the node's name).
        self.node_ids = [self.register(pub, name=client_id_of(configs[i]))
                         for i, (_, pub) in enumerate(self.certs.get("nodes", []))]
        for i, cfg in enumerate(configs):
            node_config = _flwr_config(cfg)
            self.start_node(f"supernode-{i}", node_config, self.certs["nodes"][i][0] if self.tls else None,
                            env=self.node_envs[i])
        return self

    def restart_superlink(self) -> None:
        """Kill the SuperLink (and the ServerApp it runs) and start it again on the same port: its runs are lost,
        the SuperNodes reconnect."""
        self.stop("superlink")
        self._start("superlink", self._link_args)
        time.sleep(2.0)

    def start_node(self, name: str, node_config: str = "", private_key: str | Path | None = None,
                   env: dict | None = None) -> subprocess.Popen:
        """Start a SuperNode; with tls, over TLS, signing with `private_key` (1.42 derives the public key from it and
        deprecates --auth-supernode-public-key). A node without a key asks the SuperLink to register it itself."""
        security = ["--insecure"] if not self.tls else ["--root-certificates", str(self.certs["ca"])] + \
            (["--auth-supernode-private-key", str(private_key)] if private_key else [])
        self._start(name, ["flower-supernode", *security, "--superlink", f"127.0.0.1:{self.port}",
                           "--port", str(_free_port()), *(["--node-config", node_config] if node_config else [])],
                    env)
        return self.procs[name]

    def register(self, public_key: str | Path, name: str = "", timeout: float = 30) -> int:
        """Register a SuperNode's public key with the SuperLink (under `name`); returns the node id it will have."""
        deadline = time.monotonic() + timeout
        named = ["--name", name] if name else []
        while True:  # the SuperLink may still be starting
            r = self._flwr("supernode", "register", str(public_key), "local", *named, "--format", "json", timeout=60)
            try:
                return int(json.loads(r.stdout)["node-id"])
            except (ValueError, KeyError, TypeError):
                if time.monotonic() > deadline:
                    raise FedFactoryError(f"flwr supernode register failed: {(r.stdout + r.stderr).strip()[-2000:]}"
                                          f" (logs in {self.work})") from None
                time.sleep(1.0)

    def nodes(self) -> list[dict]:
        """The SuperLink's nodes (`flwr supernode list --format json`): node-id (a string), status, ..."""
        r = self._flwr("supernode", "list", "local", "--format", "json", timeout=60)
        try:
            return json.loads(r.stdout)["nodes"]
        except (ValueError, KeyError, TypeError):
            raise FedFactoryError(f"flwr supernode list failed: {(r.stdout + r.stderr).strip()[-2000:]}") from None

    def __exit__(self, *exc):
        for p in self.procs.values():
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def _flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], capture_output=True, text=True, env=self.env, timeout=timeout)

    def run(self, run_config: dict, timeout: float = 3600) -> dict:
        """Submit the app, wait for the run to finish; returns {'run_id', 'status', 'log'}."""
        r = self._flwr("run", str(APP_DIR), "local", "--run-config", _flwr_config(run_config), "--format", "json")
        try:
            run_id = int(json.loads(r.stdout)["run-id"])
        except (ValueError, KeyError, TypeError):
            raise FedFactoryError(f"flwr run failed: {(r.stdout + r.stderr).strip()[-2000:]}") from None
        # `flwr list` is a new Python process, costly in CPU, so the run's status is asked every
        # STATUS_EVERY s, and at once when the ServerApp's results.json appears: the nodes keep the cores.
        results, begun = Path(run_config["out"]) / "results.json", time.time()
        deadline, link = time.monotonic() + timeout, self.procs["superlink"]
        status, asked, known = "", -math.inf, time.monotonic()
        while time.monotonic() < deadline:
            if self.procs["superlink"] is not link or link.poll() is not None:  # its runs are lost with it
                return {"run_id": run_id, "status": "failed: the SuperLink stopped", "log": ""}
            written = results.exists() and results.stat().st_mtime >= begun
            if written or time.monotonic() - asked >= STATUS_EVERY:
                asked = time.monotonic()
                r = self._flwr("list", "local", "--run-id", str(run_id), "--format", "json")
                try:
                    status, known = json.loads(r.stdout)["runs"][0]["status"], asked
                except (ValueError, KeyError, IndexError, TypeError):
                    status = ""
                if status.startswith("finished"):
                    break
                if asked - known >= 60:  # a minute without news of the run: the SuperLink lost it
                    return {"run_id": run_id, "status": "failed: the SuperLink no longer knows the run", "log": ""}
            time.sleep(0.5)
        else:
            status = f"timed out after {timeout:.0f} s (last status {status!r})"
        log = self._flwr("log", str(run_id), "local", "--show", timeout=30)
        return {"run_id": run_id, "status": status, "log": log.stdout + log.stderr}


def client_id_of(node_config: dict) -> str:
    """The client id a site's node uploads as (as the ClientApp derives it)."""
    if "data" in node_config:
        return str(node_config.get("client-id", Path(str(node_config["data"])).resolve().name))
    return client_id(int(node_config["partition-id"]))


# many parameters because each is one key of the ServerApp's run config (server_app.py)
def run_config(config: str | Path, out: str | Path, overrides: list[str] = (), test: str = "", resume: bool = False,
               num_nodes: int = 1, timeout: float = 3600, wait_timeout: float = 120) -> dict:
    """The ServerApp's run config (see server_app.py): paths made absolute, since the ServerApp runs elsewhere."""
    for o in overrides:
        if ";" in o:
            raise FedFactoryError(f"--set values may not contain ';': {o!r}")
    test = str(Path(test).resolve()) if test and Path(test).exists() else test
    return {"config": str(Path(config).resolve()), "overrides": ";".join(overrides), "out": str(Path(out).resolve()),
            "test": test, "resume": resume, "num-nodes": num_nodes, "wait-timeout": float(wait_timeout),
            "train-timeout": float(timeout)}


# many parameters because it takes the options of `fedfactory federate`, most of them keywords with defaults
def federate(config: str | Path, num_nodes: int, out: str | Path, overrides: list[str] = (),
             node_configs: list[dict] | None = None, timeout: float = 3600, wait_timeout: float = 120,
             test: str = "", tls: bool = False, resume: bool = False, node_envs: list[dict] | None = None) -> dict:
    """Run the one-shot federation over Flower on this machine; raises if the run did not complete.

    node_configs: one dict per node, over the default simulated site (partition-id i); a node with
    {"data": folder} is a site with its own data. test: the server's test set (see server.load_test_set).
    tls: TLS on every connection, and only the SuperNodes registered by key may join (see LocalFederation).
    resume: continue the run in `out`, reusing the modules it already received and verified.
    """
    out = Path(out).resolve()
    if not resume:
        check_new_run_dir(out)
    rc = run_config(config, out, overrides, test, resume, num_nodes, timeout, wait_timeout)
    with LocalFederation(num_nodes, node_configs, tls=tls, node_envs=node_envs) as fed:
        result = fed.run(rc, timeout=timeout + wait_timeout + 60)
    result["workdir"], result["node_ids"] = str(fed.work), fed.node_ids  # node ids: with tls, by registration
    if result["status"] != "finished:completed":
        raise FedFactoryError(f"Flower run {result['run_id']} ended {result['status']}"
                              + (f": {'; '.join(failure_lines(result['log']))}" if failure_lines(result["log"]) else "")
                              + f" (logs in {fed.work}; rerun with --resume to keep the modules received)")
    return result


def failure_lines(log: str) -> list[str]:
    """The ServerApp's own reports in a run's log: rejected nodes and errors, one line each."""
    return [l.split("fedfactory: ", 1)[1] for l in log.splitlines() if "fedfactory: node" in l or "fedfactory: error" in l]
