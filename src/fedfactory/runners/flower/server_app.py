"""The ServerApp wraps the server: wait for the sites, send one train message each, verify and store
every module, then run the same server code as `fedfactory run` (synthesis, classifier, evaluation,
report); then send the classifier home to every site, pool the counts the sites send about their own
test images, and send the report home. It holds the modules and maybe a test set, never a training image.

Run config ([tool.flwr.app.config] in app/pyproject.toml, or flwr run --run-config):
config (path of a fedfactory TOML), overrides ("key=value;key=value"), out (run folder),
test (the server's test set: a folder, CSV or .npz, or a data set name; empty = the config's data
set's test split; "none" = no test images at the coordinator: the sites evaluate), resume (keep the modules already received and verified in out), node-map
("NODE_ID=CLIENT_ID;..."), num-nodes, wait-timeout and train-timeout (seconds).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from ...classify import classifier_from_bytes
from ...config import Config, dumps, load_config
from ...errors import FedFactoryError
from ...modules import load_module
from ...modules.fileformat import check_client_id, is_module_dir, write_module_dir
from ...modules.limits import Limits
from ...registry import read_registry, register
from ...runtime import setup_runtime
from ...roster import check_agreement
from ...server import (MODEL, build, check_audit, federation_roster, module_limits, pool_site_evaluations, start_run,
                       test_set_for, write_build)
from .messages import (config_content, evaluate_content, read_answer, read_have_reply, read_module, read_weights_blob,
                       result_content)

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


# many parameters because the round's checks are separate inputs: who a node may be (assigned), what the run
# already holds (kept), what is accepted (limits, agreement); the tests drive each alone
def collect_modules(grid: Grid, nodes: list[int], cfg: Config, out: Path, timeout: float, limits: Limits,
                    assigned: dict[int, str] | None = None, kept: dict | None = None, agreement=None):
    """One round: a train message to every node; verified modules in, failures by node id.

    The server decides who a node is, not its manifest: with an identity map (SuperNode names from
    authentication, or the run config node-map) a node may upload only as the client id assigned to
    it; without one, only as an id on the roster (federation.clients, when set) that no other node
    has claimed. A reply is written to a staging folder named by node id, verified there against
    `limits` (and the consortium's `agreement`, the roster), and only then moved into the run. `kept`: client id -> module this run already holds
    (resume); their sites answer without training."""
    modules, owners, failures, roster, kept = [], {}, {}, cfg.federation.clients, kept or {}

    def admit(nid: int, cid) -> str:
        """The client id a node may hold, or a rejection naming why."""
        cid = check_client_id(cid)
        if assigned is not None and assigned.get(nid) != cid:
            raise FedFactoryError(f"it claims client id {cid!r}; this node may upload only as {assigned.get(nid)!r}")
        if roster and cid not in roster:
            raise FedFactoryError(f"client id {cid!r} is not on the federation's roster (federation.clients)")
        if cid in owners:
            raise FedFactoryError(f"client id {cid!r} was already uploaded by node {owners[cid]}")
        return cid

    def receive(nid: int, rep: Message) -> None:
        staging = out / ".incoming" / f"node-{nid}"
        try:
            have = read_have_reply(rep.content)
            if have is not None:  # resume: the site says the server holds its module already
                cid = admit(nid, have)
                if cid not in kept:
                    raise FedFactoryError(f"node says the server holds the module of {cid!r}; it does not")
                modules.append(kept[cid])
                owners[cid] = nid
                return
            blob, manifest = read_module(rep.content)
            if len(blob) > limits.max_module_bytes:
                raise FedFactoryError(f"{len(blob):,} bytes, over federation.max_module_bytes")
            cid = admit(nid, manifest.get("client_id"))
            if (out / "modules" / cid).exists():
                raise FedFactoryError(f"client id {cid!r} was already uploaded")
            write_module_dir(staging, blob, manifest)
            module = load_module(staging, cfg.runtime.device, cfg.runtime.bf16, limits=limits)
            check_audit(cfg, module)
            check_agreement(agreement, module)
            (out / "modules").mkdir(exist_ok=True)
            os.replace(staging, out / "modules" / cid)
            modules.append(module)
            owners[cid] = nid
            register(out, manifest, source=f"flower node {nid}")
        except FedFactoryError as e:
            failures[nid] = f"module rejected: {e}"
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    messages = [Message(config_content(dumps(cfg), "module", have=list(kept)), dst_node_id=nid, message_type="train")
                for nid in nodes]
    _, silent = _exchange(grid, messages, timeout, on_reply=receive)
    shutil.rmtree(out / ".incoming", ignore_errors=True)
    modules += [m for cid, m in kept.items() if cid not in owners]  # verified before: no need of their nodes
    return modules, owners, {**failures, **silent}


def kept_modules(cfg: Config, out: Path, limits: Limits) -> dict:
    """A resumed run's modules that still verify (hash against the registry, file and limits checks).
    One that does not is removed, so that its site uploads it again."""
    kept = {}
    if not (out / "registry.json").exists():
        return kept
    for cid, entry in read_registry(out)["modules"].items():
        folder = out / "modules" / check_client_id(cid)
        try:
            m = load_module(folder, cfg.runtime.device, cfg.runtime.bf16, limits=limits)
            if m.saved_manifest["weights_sha256"] != entry["sha256"] or m.client_id != cid:
                raise FedFactoryError("it does not match the registry")
            kept[cid] = m
        except FedFactoryError as e:
            print(f"fedfactory: resume: the module of {cid} is set aside and asked for again: {e}", flush=True)
            if is_module_dir(folder):
                shutil.rmtree(folder)
    return kept


def _exchange(grid: Grid, messages: list[Message], timeout: float, on_reply=None) -> tuple[dict, dict]:
    """Send, then take replies as they come: `on_reply(node_id, reply)` runs at once for each good one
    (so a module is verified and stored before the others arrive, and survives a crash after it).
    Returns replies and failures (errors, silence), both by node id."""
    node_of = dict(zip(grid.push_messages(messages), (m.metadata.dst_node_id for m in messages)))
    pending, ok, failures = set(node_of), {}, {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for rep in grid.pull_messages(pending):
            mid = rep.metadata.reply_to_message_id
            if mid not in pending:
                continue
            pending.discard(mid)
            nid = node_of[mid]
            if rep.has_error():
                failures[nid] = f"ClientApp failed: {rep.error.reason}"
                continue
            ok[nid] = rep
            if on_reply:
                on_reply(nid, rep)
        if pending:
            time.sleep(1.0)
    for mid in pending:
        failures[node_of[mid]] = f"no reply within {timeout:.0f} s"
    return ok, failures


def collect_experts(grid: Grid, modules, owners: dict, cfg: Config, num_classes: int, out: Path, timeout: float):
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
                                           cfg.classifier)
            experts[cid] = (net, {"trained_at": "site", "node": nid})
        except FedFactoryError as e:
            failures[nid] = f"classifier rejected: {e}"
    return experts, failures


def collect_evaluations(grid: Grid, owners: dict, cfg: Config, out: Path, timeout: float) -> tuple[dict, dict]:
    """The classifier goes home to every site; a site with test images of its own answers with counts.
    Returns the answers by client id (each named by the server's idea of the node, not its own) and failures."""
    blob, text = (out / MODEL).read_bytes(), dumps(cfg)
    messages = [Message(evaluate_content(text, blob), dst_node_id=nid, message_type="train") for nid in owners.values()]
    replies, failures = _exchange(grid, messages, timeout)
    answers = {}
    for cid, nid in owners.items():
        if nid not in replies:
            continue
        try:
            answer = read_answer(replies[nid].content)
        except FedFactoryError as e:
            failures[nid] = f"evaluation rejected: {e}"
            continue
        if answer is not None:
            answers[cid] = {**answer, "client_id": cid}
    return answers, failures


def send_results(grid: Grid, owners: dict, cfg: Config, out: Path, results: dict, timeout: float) -> dict:
    """The report and the metrics go home to every site, beside its classifier."""
    report = (out / "report.md").read_text()
    messages = [Message(result_content(dumps(cfg), report, results["metrics"] or {}), dst_node_id=nid,
                        message_type="train") for nid in owners.values()]
    return _exchange(grid, messages, timeout)[1]


def _report(failures: dict) -> None:
    for nid, why in failures.items():
        print(f"fedfactory: node {nid}: {why}", flush=True)


def _check(failures: dict, num_nodes: int, cfg: Config) -> None:
    """Report failures by node id; fail the run unless the config lets it go on without them."""
    _report(failures)
    if failures and cfg.federation.on_node_failure == "fail":
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


def identities(grid: Grid, nodes: list[int], node_map: str) -> dict[int, str] | None:
    """Which client id each node may upload as: the run config node-map, else the names under which
    the coordinator registered the SuperNodes' keys (`flwr supernode register KEY --name CLIENT_ID`,
    with --enable-supernode-auth). None when neither is given: first come, roster permitting."""
    explicit = parse_node_map(node_map)
    if explicit is not None:
        return explicit
    names = {n.node_id: n.name for n in grid.get_nodes() if n.node_id in nodes and n.name}
    return names or None


def serve(grid: Grid, rc: dict) -> None:
    overrides = [o for o in str(rc.get("overrides", "")).split(";") if o.strip()]
    cfg = load_config(str(rc["config"]), overrides)
    out = Path(str(rc["out"]))
    resume = bool(rc.get("resume", False))
    start_run(cfg, out, resume)
    setup_runtime(cfg)
    t = time.perf_counter()
    test_source = str(rc.get("test", ""))
    test = test_set_for(cfg, test_source)  # before any site trains: a bad test set fails at once
    timings = {"data": time.perf_counter() - t}
    nodes = wait_for_nodes(grid, int(rc["num-nodes"]), float(rc["wait-timeout"]))
    assigned = identities(grid, nodes, str(rc.get("node-map", "")))
    t = time.perf_counter()
    limits = module_limits(cfg, test)
    modules, owners, failures = collect_modules(grid, nodes, cfg, out, float(rc["train-timeout"]), limits, assigned,
                                                kept_modules(cfg, out, limits) if resume else None,
                                                federation_roster(cfg, test))
    timings["modules"] = time.perf_counter() - t
    _check(failures, len(nodes), cfg)
    if not modules:
        raise FedFactoryError("no module was received")
    experts = None
    if cfg.classifier.mode == "local":
        t = time.perf_counter()
        experts, failures = collect_experts(grid, modules, owners, cfg, test.num_classes, out,
                                            float(rc["train-timeout"]))
        timings["experts"] = time.perf_counter() - t
        _report(failures)  # a missing expert: build() leaves it out or fails, by classifier.missing_experts
    built = build(cfg, modules, test, out, experts=experts)
    results = write_build(out, built, built.results(test_source, timings))
    answers, failures = collect_evaluations(grid, owners, cfg, out, float(rc["train-timeout"]))
    _report(failures)  # a site that did not evaluate is named; the metrics say which sites they cover
    if answers or not results["metrics"]:
        results = pool_site_evaluations(out, answers)
    _report(send_results(grid, owners, cfg, out, results, float(rc["train-timeout"])))
    print(f"fedfactory: accuracy {results['metrics']['accuracy']:.4f}; report: {out / 'report.md'}", flush=True)
