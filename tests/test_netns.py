"""The README's multi-machine recipe ("Across real machines"), run across network namespaces that this
test makes: a coordinator and two hospitals, each on its own address, each site linked to the
coordinator only (a /30 of its own, no routing at the coordinator), so no site can reach another.

`fedfactory certs` makes the CA, the SuperLink's certificate for the coordinator's hostname (the sites
resolve it through their own /etc/hosts: `ip netns exec` mounts /etc/netns/<ns>/hosts over it) and the
sites' key pairs. The SuperLink keeps its state in a database (--database) and runs the ServerApp through
a SuperExec of its own (--isolation process); it is killed while the sites train and started again from
its database: the nodes it knew come back without registering again, and the same run completes.

Needs root and `ip netns` (CI has both); skipped with the reason elsewhere (a failure under CI=true).
"""

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from ipaddress import ip_address
from pathlib import Path

import pytest

from fedfactory.cli import main
from fedfactory.runners.flower.federation import APP_DIR, BIN, flower_tools_missing
from helpers import STRICT, assert_pooled_equals_union, union_metrics


HOST, PORT = "coordinator.fedfactory.test", 8000
SITES = ("client-0", "client-1")  # the hospitals fixture's sites (the folders' names are their client ids)


# iproute2's `ip`, also where /usr/sbin is not on PATH
IP = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.access(p, os.X_OK)), None)


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)


class Namespaces:
    """Three network namespaces: the coordinator `coord`, and one per site, each site linked to the
    coordinator by a veth pair on a /30 of its own. Every process started here, the namespaces, their
    links and their /etc/netns files go away in close(), whatever happened."""

    def __init__(self, work: Path):
        tag = secrets.token_hex(3)
        self.work, self.tag = work, tag
        self.ns = {"coord": f"ff-coord-{tag}", SITES[0]: f"ff-siteA-{tag}", SITES[1]: f"ff-siteB-{tag}"}
        # site k <-> coordinator on 10.231.k.0/30: the coordinator is .1, the site .2
        self.coord_addr = {s: f"10.231.{k}.1" for k, s in enumerate(SITES, 1)}
        self.site_addr = {s: f"10.231.{k}.2" for k, s in enumerate(SITES, 1)}
        self.made: list[str] = []
        self.links = [f"ffc{k}-{tag}" for k in range(1, len(SITES) + 1)]  # 11 characters: within IFNAMSIZ
        self.etc: list[Path] = []
        self.made_etc_netns = False
        self.procs: dict[str, subprocess.Popen] = {}

    def setup(self) -> None:
        if IP is None:
            pytest.skip("iproute2's `ip` is not installed: this test runs the recipe across `ip netns` namespaces")
        r = _ip("netns", "add", self.ns["coord"])
        if r.returncode != 0:
            pytest.skip(f"`ip netns add` is not permitted here (it needs root, or CAP_NET_ADMIN and CAP_SYS_ADMIN): "
                        f"{r.stderr.strip()}")
        self.made.append(self.ns["coord"])
        for s in SITES:
            self._check(_ip("netns", "add", self.ns[s]))
            self.made.append(self.ns[s])
        for k, s in enumerate(SITES, 1):
            a, b = self.links[k - 1], f"ffs{k}-{self.tag}"
            self._check(_ip("link", "add", a, "type", "veth", "peer", "name", b))
            self._check(_ip("link", "set", a, "netns", self.ns["coord"]))
            self._check(_ip("link", "set", b, "netns", self.ns[s]))
            self._check(_ip("-n", self.ns["coord"], "addr", "add", f"{self.coord_addr[s]}/30", "dev", a))
            self._check(_ip("-n", self.ns[s], "addr", "add", f"{self.site_addr[s]}/30", "dev", b))
            self._check(_ip("-n", self.ns["coord"], "link", "set", a, "up"))
            self._check(_ip("-n", self.ns[s], "link", "set", b, "up"))
        for ns in self.ns.values():
            self._check(_ip("-n", ns, "link", "set", "lo", "up"))
        # the coordinator routes nothing between its links
        self._check(self.run("coord", [sys.executable, "-c",
                                       "open('/proc/sys/net/ipv4/ip_forward', 'w').write('0')"]))
        # each namespace resolves the coordinator's hostname: to its own address on that site's link
        etc = Path("/etc/netns")
        self.made_etc_netns = not etc.exists()
        for role, ns in self.ns.items():
            address = self.coord_addr[SITES[0]] if role == "coord" else self.coord_addr[role]
            (etc / ns).mkdir(parents=True)
            self.etc.append(etc / ns)
            (etc / ns / "hosts").write_text(f"127.0.0.1 localhost\n{address} {HOST}\n")

    @staticmethod
    def _check(r: subprocess.CompletedProcess) -> None:
        assert r.returncode == 0, f"{r.args}: {r.stderr.strip()}"

    def command(self, role: str, args: list[str]) -> list[str]:
        return [IP, "netns", "exec", self.ns[role], *args]

    def run(self, role: str, args: list[str], env: dict | None = None, timeout: float = 60):
        return subprocess.run(self.command(role, args), capture_output=True, text=True, env=env, timeout=timeout)

    def start(self, role: str, name: str, args: list[str], env: dict) -> subprocess.Popen:
        """A process in `role`'s namespace, in a process group of its own, its output in WORK/name.log."""
        with open(self.work / f"{name}.log", "a") as log:
            p = subprocess.Popen(self.command(role, args), stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
        self.procs[name] = p
        return p

    def stop(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs.pop(name)
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def close(self) -> None:
        for name in list(self.procs):
            try:
                self.stop(name, signal.SIGTERM)
            except Exception:  # noqa: BLE001  (clean up the rest whatever happens)
                pass
        for ns in self.made:  # what is left in a namespace was started here (a ServerApp, a ClientApp)
            for pid in _ip("netns", "pids", ns).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns)  # its veth ends go with it
        for link in self.links:  # a pair that never left this namespace (deleting one end deletes both)
            if _ip("link", "show", link).returncode == 0:
                _ip("link", "del", link)
        for folder in self.etc:
            shutil.rmtree(folder, ignore_errors=True)
        if self.made_etc_netns:
            try:
                Path("/etc/netns").rmdir()
            except OSError:
                pass


@pytest.fixture
def namespaces(tmp_path):
    net = Namespaces(tmp_path)
    try:
        net.setup()
        yield net
    finally:
        net.close()


PROBE = """import json, socket, sys
out = {"resolved": socket.gethostbyname(sys.argv[1])}
for target in sys.argv[2:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        out[target] = "open"
    except OSError as e:
        out[target] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"""

# a TLS handshake with the SuperLink, trusting only the consortium's CA, by each name in argv[3:]
TLS_PROBE = """import json, socket, ssl, sys
ca, port, out = sys.argv[1], int(sys.argv[2]), {}
for name in sys.argv[3:]:
    context = ssl.create_default_context(cafile=ca)
    try:
        with context.wrap_socket(socket.create_connection((name, port), timeout=5), server_hostname=name):
            out[name] = "verified"
    except (OSError, ssl.SSLError) as e:
        out[name] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"""


def probe(net: Namespaces, role: str, *targets: str, script: str = PROBE, args=(HOST,)) -> dict:
    r = net.run(role, [sys.executable, "-c", script, *args, *targets])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# -- unit: what `fedfactory certs` writes -------------------------------------------------------------

def _verify(folder: Path, name: str):
    """Strict X.509 verification of the SuperLink's certificate for `name`, trusting only the CA in `folder`."""
    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, Store

    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((folder / "server.pem").read_bytes())
    try:
        subject = x509.IPAddress(ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    return PolicyBuilder().store(Store([ca])).build_server_verifier(subject).verify(cert, [])


def test_certs_makes_what_each_host_needs_and_never_overwrites(tmp_path, capsys):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
    from cryptography.x509.verification import VerificationError

    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--hostname", "Coordinator.Example.org", "--ip", "10.0.0.1",
                 "--sites", "hospital-a", "hospital-b"]) == 0
    said = capsys.readouterr().out
    assert "flwr supernode register" in said and "--name hospital-b" in said and "hospital-a/hospital-a.pub" in said
    for name in ("coordinator.example.org", "10.0.0.1"):
        _verify(out, name)
    for other in ("example.org", "10.0.0.2", "localhost"):
        with pytest.raises(VerificationError):
            _verify(out, other)
    assert {p.name for p in out.iterdir()} == {"ca.crt", "server.pem", "server.key", "superexec.secret", "sites"}
    for site in ("hospital-a", "hospital-b"):
        folder = out / "sites" / site
        assert {p.name for p in folder.iterdir()} == {site, f"{site}.pub", "ca.crt"}
        assert (folder / "ca.crt").read_bytes() == (out / "ca.crt").read_bytes()
        key = load_ssh_private_key((folder / site).read_bytes(), None)
        assert key.public_key() == load_ssh_public_key((folder / f"{site}.pub").read_bytes())
    for private in (out / "server.key", out / "superexec.secret", *out.glob("sites/*/hospital-?")):
        assert private.stat().st_mode & 0o777 == 0o600, private
    assert len({(out / "sites" / s / f"{s}.pub").read_bytes() for s in ("hospital-a", "hospital-b")}) == 2

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["certs", "--out", str(out), "--hostname", "other.example.org", "--sites", "hospital-c"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # not a byte changed, nothing added
    for bad, why in ((["--hostname", "x", "--sites", "../etc"], "client id '../etc' is not allowed"),
                     (["--hostname", "not a name"], "not a DNS name"), (["--ip", "10.0.0.256"], "not an IPv4"),
                     (["--sites", "a"], "--hostname NAME and/or --ip"),
                     (["--hostname", "x", "--sites", "a", "a"], "named twice")):
        assert main(["certs", "--out", str(tmp_path / "new"), *bad]) == 2
        assert why in capsys.readouterr().err
        assert not (tmp_path / "new").exists()


def test_tls_material_on_one_machine_is_for_loopback_as_before(tmp_path):
    from fedfactory.runners.flower.federation import make_tls_material

    m = make_tls_material(tmp_path, 2)
    for name in ("127.0.0.1", "localhost"):
        _verify(tmp_path, name)
    assert [p.name for p, _ in m["nodes"]] == ["supernode-0", "supernode-1"]
    m = make_tls_material(tmp_path, 1)  # on one machine a new federation may take the same folder again
    _verify(tmp_path, "127.0.0.1")


# -- end to end: the recipe across namespaces -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(bool(flower_tools_missing()), reason="Flower CLI not installed")
def test_the_multi_machine_recipe_across_namespaces_survives_a_superlink_restart(
        hospitals, namespaces, tmp_path):
    root, config, test = hospitals
    net, work = namespaces, tmp_path
    env = {**os.environ, "PATH": os.pathsep.join([BIN, os.environ.get("PATH", "")]), "OMP_NUM_THREADS": "1"}

    # the coordinator makes the CA, the SuperLink's certificate for its hostname, and the sites' keys
    assert main(["certs", "--out", str(work / "certs"), "--hostname", HOST, "--sites", *SITES]) == 0
    certs = work / "certs"
    secret = certs / "superexec.secret"

    # the coordinator: a SuperLink with its state in a database, and its own SuperExec for the ServerApp
    coord = {**env, "FLWR_HOME": str(work / "coordinator")}
    (work / "coordinator").mkdir()
    (work / "coordinator/config.toml").write_text(
        f'[superlink]\ndefault = "my-superlink"\n\n[superlink.my-superlink]\naddress = "{HOST}:{PORT}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n')
    db = work / "superlink.db"
    link = ["flower-superlink", "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--database", str(db), "--isolation", "process",
            "--superexec-auth-secret-file", str(secret), "--host", "0.0.0.0", "--port", str(PORT)]
    net.start("coord", "superlink", link, coord)
    net.start("coord", "superexec", ["flower-superexec", "--runtime-api-address", f"{HOST}:{PORT}",
                                     "--root-certificates", str(certs / "ca.crt"),
                                     "--superexec-auth-secret-file", str(secret)], coord)

    def flwr(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return net.run("coord", ["flwr", *args], env=coord, timeout=timeout)

    node_ids = {}
    for site in SITES:  # once per site: its public key, under its client id
        deadline = time.monotonic() + 60
        while True:  # the SuperLink may still be starting
            r = flwr("supernode", "register", str(certs / "sites" / site / f"{site}.pub"), "my-superlink",
                     "--name", site, "--format", "json")
            try:
                node_ids[site] = int(json.loads(r.stdout)["node-id"])
                break
            except (ValueError, KeyError, TypeError):
                assert time.monotonic() < deadline, f"flwr supernode register: {r.stdout}{r.stderr}"
                time.sleep(1.0)

    # each site, with its own copy of its folder from `fedfactory certs`, its data, test images and policy
    for site in SITES:
        home = work / site
        shutil.copytree(certs / "sites" / site, home / "keys")
        (home / "site-policy.toml").write_text(STRICT.format(keep=home / "kept"))
        node_config = (f"data='{root / 'sites' / site}' test='{root / 'tests' / site}' "
                       f"policy='{home / 'site-policy.toml'}'")
        net.start(site, site, ["flower-supernode", "--superlink", f"{HOST}:{PORT}",
                               "--root-certificates", str(home / "keys/ca.crt"),
                               "--auth-supernode-private-key", str(home / "keys" / site),
                               "--node-config", node_config], {**env, "FLWR_HOME": str(home / "flwr")})

    # no site reaches another; each reaches the coordinator, by its hostname, on its own link
    a, b = SITES
    net.start(b, "listener", [sys.executable, "-c", "import socket, time; s = socket.socket(); "
                              "s.bind(('0.0.0.0', 9999)); s.listen(); time.sleep(3600)"], env)
    time.sleep(1.0)
    seen = probe(net, a, f"{net.coord_addr[a]}:{PORT}", f"{net.site_addr[b]}:9999", f"{net.coord_addr[b]}:{PORT}")
    assert seen["resolved"] == net.coord_addr[a] and seen[f"{net.coord_addr[a]}:{PORT}"] == "open", seen
    assert seen[f"{net.site_addr[b]}:9999"] != "open" and seen[f"{net.coord_addr[b]}:{PORT}"] != "open", seen
    assert probe(net, "coord", f"{net.site_addr[b]}:9999")[f"{net.site_addr[b]}:9999"] == "open"  # B listens
    seen = probe(net, b, f"{net.coord_addr[b]}:{PORT}", f"{net.site_addr[a]}:{PORT}")
    assert seen["resolved"] == net.coord_addr[b] and seen[f"{net.coord_addr[b]}:{PORT}"] == "open", seen
    assert seen[f"{net.site_addr[a]}:{PORT}"] != "open", seen
    net.stop("listener")
    # the certificate names the coordinator's hostname (and nothing else): reached by its address, TLS fails
    seen = probe(net, a, HOST, net.coord_addr[a], script=TLS_PROBE, args=(str(certs / "ca.crt"), str(PORT)))
    assert seen[HOST] == "verified" and "CERTIFICATE_VERIFY_FAILED" in seen[net.coord_addr[a]], seen

    # a SuperExec without the coordinator's secret (at a site, which reaches the SuperLink's address) may not
    # claim the ServerApp's task
    net.start(a, "rogue-superexec", ["flower-superexec", "--runtime-api-address", f"{HOST}:{PORT}",
                                     "--root-certificates", str(certs / "ca.crt")],
              {**env, "FLWR_HOME": str(work / "rogue")})

    # the coordinator submits the run: no test images at the coordinator, the sites evaluate
    out = work / "run"
    r = flwr("run", str(APP_DIR), "my-superlink", "--run-config",
             f"config='{config}' test='none' out='{out}' num-nodes=2", "--format", "json", timeout=120)
    run_id = json.loads(r.stdout)["run-id"]

    def status() -> str:
        r = flwr("list", "my-superlink", "--run-id", run_id, "--format", "json")
        try:
            return json.loads(r.stdout)["runs"][0]["status"]
        except (ValueError, KeyError, IndexError, TypeError):
            return ""

    # the SuperLink dies while the sites train (each has started its ClientApp, no module has come back)
    deadline = time.monotonic() + 240
    while not all("Start `flwr-clientapp` process" in (work / f"{s}.log").read_text() for s in SITES):
        assert time.monotonic() < deadline, "the sites never started their ClientApps"
        time.sleep(0.3)
    received_before = sorted(os.listdir(out / "modules")) if (out / "modules").exists() else []
    net.stop("superlink")  # SIGKILL to its process group: no clean shutdown
    assert len(received_before) < len(SITES)
    net.start("coord", "superlink", link, coord)  # the same flags, the same database

    # its state survived: the nodes it knew come back under their registered ids, with no new registration
    deadline = time.monotonic() + 90
    while True:
        r = flwr("supernode", "list", "my-superlink", "--format", "json")
        try:
            nodes = {int(n["node-id"]): n["status"] for n in json.loads(r.stdout)["nodes"]}
        except (ValueError, KeyError, TypeError):
            nodes = {}
        if nodes == {nid: "online" for nid in node_ids.values()} or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert nodes == {nid: "online" for nid in node_ids.values()}, (nodes, node_ids)

    first, restarted = (work / "superlink.log").read_text().split("Starting Flower SuperLink")[1:]
    assert "RegisterNode" in first and "RegisterNode" not in restarted

    deadline = time.monotonic() + 300
    while not (state := status()).startswith("finished"):
        assert time.monotonic() < deadline, f"run {run_id} still {state!r}"
        time.sleep(3.0)
    log = flwr("log", run_id, "my-superlink", "--show").stdout
    assert state == "finished:completed", log[-3000:]

    # the run is whole: both modules (received from the nodes registered before the restart), the pooled
    # evaluation by the sites, and the classifier and report home at each site
    results = json.loads((out / "results.json").read_text())
    assert_pooled_equals_union(results, union_metrics(out / "model.safetensors", test))
    entries = [json.loads(l) for l in (out / "audit.jsonl").read_text().splitlines()]
    sources = {e["client"]: e["source"] for e in entries if "source" in e}
    assert sources == {site: f"flower node {node_ids[site]}" for site in SITES}
    for site in SITES:
        kept = work / site / "kept" / f"{site}-result"
        assert (kept / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
        assert json.loads((kept / "metrics.json").read_text()) == results["metrics"]
    # the SuperExec at the site was refused at its first request and gave up, having run nothing
    refused = rf'{re.escape(net.site_addr[a])}:\d+ - "POST /v1/runtime/acquire-task HTTP/1.1" 401'
    assert re.search(refused, (work / "superlink.log").read_text())
    assert net.procs["rogue-superexec"].poll() is not None
    assert "flwr-serverapp" not in (work / "rogue-superexec.log").read_text()
    print(f"modules received before the SuperLink restart: {received_before or 'none'}; run {run_id}: {state}")
