"""The ServerApp: wait for the sites, send one train message each, verify and store every module,
then run the same factory as `fedfactory run` (synthesis, classifier, evaluation, report).

Run config ([tool.flwr.app.config] in flower-app/pyproject.toml, or flwr run --run-config):
config (path of a fedfactory TOML), overrides ("key=value;key=value"), out (run folder),
num-nodes, wait-timeout and train-timeout (seconds).
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from ...classify import build_classifier
from ...config import dumps, load_config
from ...errors import FedFactoryError
from ...modules import load_module
from ...modules.fileformat import write_module_dir
from ...registry import register
from ...utils import atomic_write_text
from ..embedded import build, check_new_run_dir, prepare_data, setup_runtime
from .messages import config_content, read_module, read_weights_blob

app = ServerApp()


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes[:expected] if expected > 0 else nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {expected} SuperNodes connected within {timeout:.0f} s")
        time.sleep(1.0)


def collect_modules(grid: Grid, nodes: list[int], cfg: dict, out: Path, timeout: float):
    """One round: a train message to every node; verified modules in, failures by node id."""
    messages = [Message(config_content(dumps(cfg), "module"), dst_node_id=nid, message_type="train") for nid in nodes]
    replies, failures = _exchange(grid, messages, timeout)
    modules, owners = [], {}
    for nid, rep in replies.items():
        try:
            blob, manifest = read_module(rep.content)
            cid = str(manifest.get("client_id", ""))
            if not cid or cid in owners:
                raise FedFactoryError(f"bad or duplicate client id {cid!r}")
            path = out / "modules" / cid
            write_module_dir(path, blob, manifest)
            modules.append(load_module(path, cfg["runtime"]["device"], cfg["runtime"]["bf16"]))
            owners[cid] = nid
            register(out, manifest, source=f"flower node {nid}")
        except FedFactoryError as e:
            failures[nid] = f"module rejected: {e}"
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
            net = build_classifier(channels, num_classes, cfg["classifier"]["preset"], cfg["classifier"]["width"])
            net.load_state_dict(load_safetensors(read_weights_blob(replies[nid].content)))
            experts[cid] = net.eval()
        except (FedFactoryError, SafetensorError, RuntimeError, ValueError) as e:
            failures[nid] = f"classifier rejected: {e}"
    return experts, failures


def _check(failures: dict, num_nodes: int, cfg: dict) -> None:
    """Report failures by node id; fail the run unless the config lets it go on without them."""
    for nid, why in failures.items():
        print(f"fedfactory: node {nid}: {why}", flush=True)
    if failures and cfg["factory"]["missing_classes"] == "error":
        raise RuntimeError(f"{len(failures)} of {num_nodes} nodes failed ("
                           + "; ".join(f"node {n}: {w}" for n, w in failures.items())
                           + '); set factory.missing_classes="drop" to go on without them')


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    overrides = [o for o in str(rc.get("overrides", "")).split(";") if o.strip()]
    cfg = load_config(str(rc["config"]), overrides)
    out = Path(str(rc["out"]))
    check_new_run_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.toml", dumps(cfg))
    setup_runtime(cfg)
    nodes = wait_for_nodes(grid, int(rc["num-nodes"]), float(rc["wait-timeout"]))
    t = time.perf_counter()
    modules, owners, failures = collect_modules(grid, nodes, cfg, out, float(rc["train-timeout"]))
    timings = {"modules": time.perf_counter() - t}
    _check(failures, len(nodes), cfg)
    if not modules:
        raise RuntimeError("no module was received")
    t = time.perf_counter()
    ds, part = prepare_data(cfg)
    timings["data"] = time.perf_counter() - t
    experts = None
    if cfg["classifier"]["mode"] == "local":
        t = time.perf_counter()
        experts, failures = collect_experts(grid, modules, owners, cfg, ds.num_classes, out, float(rc["train-timeout"]))
        timings["experts"] = time.perf_counter() - t
        _check(failures, len(nodes), cfg)
    received = {m.client_id for m in modules}
    for cid in [c for c in part.clients if c not in received]:
        del part.indices[cid], part.counts[cid]
    modules.sort(key=lambda m: part.clients.index(m.client_id))
    results = build(cfg, ds, part, modules, out, timings, experts=experts)
    print(f"fedfactory: accuracy {results['metrics']['accuracy']:.4f}; report: {out / 'report.md'}", flush=True)
