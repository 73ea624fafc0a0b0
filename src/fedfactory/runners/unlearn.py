"""Exact modular unlearning: drop a client's module and rebuild from the rest.

The federation's state is its set of modules, and every later step (synthesis streams, classifier
seeds) is keyed by stable names, so the rebuilt run is exactly the run that a federation without
that client would have produced: same synthetic set, same classifier weights, same metrics.
The remaining modules' kept synthetic draws (factory.ShardStore) are copied over rather than
sampled again, so forgetting costs about one classifier training.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..config import dumps, load_config
from ..errors import FedFactoryError
from ..factory import ShardStore, plan, shard_keys
from ..modules import load_module
from ..registry import append_audit, read_registry, verify
from ..report import METRICS, write_report
from ..utils import atomic_write_json, atomic_write_text
from ..runtime import setup_runtime
from ..server import NO_TEST_SET, build, images_digest, load_results, shard_store, test_set_for


def unlearn(run_dir: str | Path, client: str, out: str | Path | None = None, reason: str = "",
            orphaned: str = "drop") -> dict:
    """Rebuild `run_dir` without `client` into `out` (default: RUN_DIR-without-CLIENT).

    orphaned: what to do with classes that only `client` covered: 'drop' (rebuild; they are
    never predicted) or 'error' (stop before changing anything).
    """
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir.with_name(f"{run_dir.name}-without-{client}")
    before = load_results(run_dir)
    cfg = load_config(run_dir / "config.toml")
    if cfg["classifier"]["mode"] == "local":
        raise FedFactoryError("a local-mode run cannot be rebuilt at the server: every remaining site must retrain "
                              "its expert without the forgotten module (fedfactory site expert), then run "
                              "fedfactory server build with the remaining modules and experts")
    registry = read_registry(run_dir)
    if client not in registry["modules"]:
        raise FedFactoryError(f"{run_dir} has no module of client {client!r}; its clients: {sorted(registry['modules'])}")
    problems = verify(run_dir)
    if problems:
        raise FedFactoryError(f"{run_dir} does not verify, fix it first: {problems[0]}")
    if out.exists() and any(out.iterdir()):
        raise FedFactoryError(f"{out} already exists: choose another --out")
    keep = {cid: e for cid, e in registry["modules"].items() if cid != client}
    held = {c for e in keep.values() for c in e["classes"]}
    orphans = sorted(c for c in registry["modules"][client]["classes"] if c not in held)
    names = before["dataset"]["class_names"]
    if orphans and orphaned == "error":
        raise FedFactoryError(f"{client} is the only holder of class(es) {', '.join(names[c] for c in orphans)}: "
                              "the rebuilt model could not predict them (use --orphaned drop to rebuild without them)")

    setup_runtime(cfg)
    t = time.perf_counter()
    by_sites = before.get("evaluation", {}).get("by") == "sites"  # then the sites evaluate the rebuilt run
    source = NO_TEST_SET if by_sites else before.get("test", {}).get("source", "")
    test = test_set_for(cfg, source)  # the run's own test set, never a training image
    if not by_sites and before.get("test", {}).get("sha256") not in (None, images_digest(test)):
        raise FedFactoryError(f"the test set at {source or cfg['data']['name']} changed since the run was built")
    cfg["partition"]["exclude"] = sorted(set(cfg["partition"]["exclude"]) | {client})
    if orphans:
        cfg["factory"]["missing_classes"] = "drop"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(run_dir / "audit.jsonl", out / "audit.jsonl")
    for cid, entry in keep.items():  # the remaining modules, unchanged
        shutil.copytree(run_dir / entry["path"], out / entry["path"])
    atomic_write_json(out / "registry.json", {"modules": keep})
    append_audit(out, "remove", client=client, sha256=registry["modules"][client]["sha256"], reason=reason,
                 orphaned_classes=orphans, source_run=str(run_dir))
    atomic_write_text(out / "config.toml", dumps(cfg))

    modules = [load_module(out / e["path"], cfg["runtime"]["device"], cfg["runtime"]["bf16"]) for e in keep.values()]
    store = shard_store(cfg, out)
    if store is not None:  # the kept modules' draws that the new plan asks for, as they are: never the client's own
        f = cfg["factory"]
        draws, _ = plan(modules, test.num_classes, f["per_class"], f["aggregation"], f["max_share"])
        store.adopt(ShardStore(run_dir / "synthetic"), shard_keys(modules, draws, cfg["seed"]).values())
    timings = {"data": time.perf_counter() - t}
    reference = None
    if "reference" in before.get("quality", {}):  # a simulated federation: its quality report's
        from .embedded import prepare_data, sites_reference  # reference, retrained without the client's images

        t = time.perf_counter()
        reference = sites_reference(cfg, *prepare_data(cfg))
        timings["reference"] = time.perf_counter() - t
    lines = ["## Unlearning", "",
             f"Client **{client}** was removed{f' (reason: {reason})' if reason else ''}; its module "
             f"(SHA-256 `{registry['modules'][client]['sha256'][:16]}`) is not in this run. Everything below was "
             f"rebuilt from the remaining {len(keep)} modules with the original config and seed, which is exactly "
             "what a federation without this client would have produced.", ""]
    if orphans:
        lines += [f"Classes that lost their only module, now never predicted: "
                  f"**{', '.join(names[c] for c in orphans)}**.", ""]
    results = build(cfg, modules, test, out, timings, test_source=source, reference=reference)
    if results["metrics"]:
        lines += ["| metric | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {before['metrics'][k]:.4f} | {results['metrics'][k]:.4f} |" for k in METRICS]
    else:
        lines += ["The sites evaluate the rebuilt classifier as they did the first (`fedfactory site evaluate`, then "
                  "`fedfactory server pool`).", ""]
    results["unlearning"] = {"client": client, "reason": reason, "orphaned_classes": orphans, "source_run": str(run_dir),
                             "run_dir": str(out),
                             "metrics_before": {k: before["metrics"][k] for k in METRICS} if before["metrics"] else None}
    atomic_write_json(out / "results.json", results)
    write_report(out, results, names, extra="\n".join(lines))
    return results
