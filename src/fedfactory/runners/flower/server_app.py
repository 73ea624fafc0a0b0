"""The ServerApp wraps the server: wait for the sites, send one train message each, verify and store
every module, then run the same server code as `fedfactory run` (synthesis, classifier, evaluation,
report). It holds the modules and a test set, never a training image.

Run config ([tool.flwr.app.config] in app/pyproject.toml, or flwr run --run-config):
config (path of a fedfactory TOML), overrides ("key=value;key=value"), out (run folder),
test (the server's test set: a folder, CSV or .npz, or a data set name; empty = the config's data
set's test split), num-nodes, wait-timeout and train-timeout (seconds).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from ...classify import classifier_from_bytes
from ...config import dumps, load_config
from ...errors import FedFactoryError
from ...modules import load_module
from ...modules.fileformat import check_client_id, write_module_dir
from ...modules.limits import Limits
from ...registry import register
from ...runtime import setup_runtime
from ...server import build, load_test_set, module_limits, start_run
from .messages import config_content, read_module, read_weights_blob

app = ServerApp()


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes[:expected] if expected > 0 else nodes
        if time.monotonic() > deadline:
            raise FedFactoryError(f"only {len(nodes)} of {expected} SuperNodes connected within {timeout:.0f} s")
        time.sleep(1.0)


def collect_modules(grid: Grid, nodes: list[int], cfg: dict, out: Path, timeout: float, limits: Limits,
                    assigned: dict[int, str] | None = None):
    """One round: a train message to every node; verified modules in, failures by node id.

    The server decides who a node is, not its manifest: with a node map (run config node-map) a node
    may upload only as the client id assigned to it; without one, only as an id on the roster
    (federation.clients, when set) that no other node has claimed. A reply is written to a staging
    folder named by node id, verified there against `limits`, and only then moved into the run."""
    messages = [Message(config_content(dumps(cfg), "module"), dst_node_id=nid, message_type="train") for nid in nodes]
    replies, failures = _exchange(grid, messages, timeout)
    modules, owners, roster = [], {}, cfg["federation"]["clients"]
    for nid, rep in sorted(replies.items()):
        staging = out / ".incoming" / f"node-{nid}"
        try:
            blob, manifest = read_module(rep.content)
            if len(blob) > limits.max_module_bytes:
                raise FedFactoryError(f"{len(blob):,} bytes, over federation.max_module_bytes")
            cid = check_client_id(manifest.get("client_id"))
            if assigned is not None and assigned.get(nid) != cid:
                raise FedFactoryError(f"its manifest claims client id {cid!r}; this node may upload only as "
                                      f"{assigned.get(nid)!r}")
            if roster and cid not in roster:
                raise FedFactoryError(f"client id {cid!r} is not on the federation's roster (federation.clients)")
            if cid in owners or (out / "modules" / cid).exists():
                raise FedFactoryError(f"client id {cid!r} was already uploaded" +
                                      (f" by node {owners[cid]}" if cid in owners else ""))
            write_module_dir(staging, blob, manifest)
            module = load_module(staging, cfg["runtime"]["device"], cfg["runtime"]["bf16"], limits=limits)
            (out / "modules").mkdir(exist_ok=True)
            os.replace(staging, out / "modules" / cid)
            modules.append(module)
            owners[cid] = nid
            register(out, manifest, source=f"flower node {nid}")
        except FedFactoryError as e:
            failures[nid] = f"module rejected: {e}"
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(out / ".incoming", ignore_errors=True)
    return modules, owners, failures


def _exchange(grid: Grid, messages: list[Message], timeout: float) -> tuple[dict, dict]:
    """Send, wait; replies by node id, and failures (errors, silence) by node id."""
    replies = {rep.metadata.src_node_id: rep for rep in grid.send_and_receive(messages, timeout=timeout)}
    ok, failures = {}, {}
    for m in messages:
        nid = m.metadata.dst_node_id
        rep = replies.get(nid)
        if rep is None:
            failures[nid] = f"no reply within {timeout:.0f} s"
        elif rep.has_error():
            failures[nid] = f"ClientApp failed: {rep.error.reason}"
        else:
            ok[nid] = rep
    return ok, failures


def collect_experts(grid: Grid, modules, owners: dict, cfg: dict, num_classes: int, out: Path, timeout: float):
    """Local mode: each site gets the OTHER sites' modules (still the one exchange of modules)
    and replies with its expert classifier."""
    blobs = {m.client_id: ((out / "modules" / m.client_id / "module.safetensors").read_bytes(), m.saved_manifest)
             for m in modules}
    messages = [Message(config_content(dumps(cfg), "expert", [b for c, b in blobs.items() if c != cid]),
                        dst_node_id=nid, message_type="train") for cid, nid in owners.items()]
    replies, failures = _exchange(grid, messages, timeout)
    experts = {}
    channels = modules[0].image_shape[-1]
    for cid, nid in owners.items():
        if nid not in replies:
            continue
        try:
            net, _ = classifier_from_bytes(read_weights_blob(replies[nid].content), channels, num_classes,
                                           cfg["classifier"])
            experts[cid] = (net, {"trained_at": "site", "node": nid})
        except FedFactoryError as e:
            failures[nid] = f"classifier rejected: {e}"
    return experts, failures


def _report(failures: dict) -> None:
    for nid, why in failures.items():
        print(f"fedfactory: node {nid}: {why}", flush=True)


def _check(failures: dict, num_nodes: int, cfg: dict) -> None:
    """Report failures by node id; fail the run unless the config lets it go on without them."""
    _report(failures)
    if failures and cfg["federation"]["on_node_failure"] == "fail":
        raise FedFactoryError(f"{len(failures)} of {num_nodes} nodes failed ("
                              + "; ".join(f"node {n}: {w}" for n, w in failures.items())
                              + '); set federation.on_node_failure="continue" to go on without them')


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        serve(grid, context.run_config)
    except FedFactoryError as e:  # one clear line in the run's log (the launcher shows it), then fail the run
        print(f"fedfactory: error: {e}", flush=True)
        raise


def parse_node_map(text: str) -> dict[int, str] | None:
    """Run config node-map "NODE_ID=CLIENT_ID;..." (None when empty: no fixed map)."""
    if not text.strip():
        return None
    out = {}
    for item in filter(str.strip, text.split(";")):
        nid, sep, cid = item.partition("=")
        if not sep or not nid.strip().isdigit():
            raise FedFactoryError(f"node-map entries are NODE_ID=CLIENT_ID, got {item!r}")
        out[int(nid)] = check_client_id(cid.strip())
    return out


def serve(grid: Grid, rc: dict) -> None:
    overrides = [o for o in str(rc.get("overrides", "")).split(";") if o.strip()]
    cfg = load_config(str(rc["config"]), overrides)
    out = Path(str(rc["out"]))
    start_run(cfg, out)
    setup_runtime(cfg)
    t = time.perf_counter()
    test_source = str(rc.get("test", ""))
    test = load_test_set(cfg, test_source)  # before any site trains: a bad test set fails at once
    timings = {"data": time.perf_counter() - t}
    assigned = parse_node_map(str(rc.get("node-map", "")))
    nodes = wait_for_nodes(grid, int(rc["num-nodes"]), float(rc["wait-timeout"]))
    t = time.perf_counter()
    modules, owners, failures = collect_modules(grid, nodes, cfg, out, float(rc["train-timeout"]),
                                                module_limits(cfg, test), assigned)
    timings["modules"] = time.perf_counter() - t
    _check(failures, len(nodes), cfg)
    if not modules:
        raise FedFactoryError("no module was received")
    experts = None
    if cfg["classifier"]["mode"] == "local":
        t = time.perf_counter()
        experts, failures = collect_experts(grid, modules, owners, cfg, test.num_classes, out,
                                            float(rc["train-timeout"]))
        timings["experts"] = time.perf_counter() - t
        _report(failures)  # a missing expert: build() leaves it out or fails, by classifier.missing_experts
    results = build(cfg, modules, test, out, timings, experts=experts, test_source=test_source)
    print(f"fedfactory: accuracy {results['metrics']['accuracy']:.4f}; report: {out / 'report.md'}", flush=True)
