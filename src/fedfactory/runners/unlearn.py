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
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, dumps, load_config
from ..errors import FedFactoryError
from ..factory import ShardStore, plan, shard_keys
from ..data import LabelledImages
from ..modules import GenerativeModule, load_module
from ..registry import append_audit, read_registry, verify
from ..report import METRICS
from ..utils import atomic_write_json, atomic_write_text
from ..runtime import setup_runtime
from ..server import NO_TEST_SET, build, images_digest, load_results, shard_store, test_set_for, write_build
from .common import prepare_data, sites_reference


@dataclass
class Removal:
    """A checked request to forget one client's module."""
    run_dir: Path
    out: Path
    client: str
    reason: str
    before: dict          # the run's results
    cfg: Config             # the run's config
    registry: dict        # the run's modules
    orphans: list[int]    # classes that only the client covered

    @property
    def keep(self) -> dict:
        """The registry entries of the remaining modules."""
        return {cid: e for cid, e in self.registry["modules"].items() if cid != self.client}

    @property
    def names(self) -> list[str]:
        return self.before["dataset"]["class_names"]


def check_removal(run_dir: Path, client: str, out: Path, reason: str, orphaned: str) -> Removal:
    """Everything that could stop the unlearning, checked before anything is written."""
    before = load_results(run_dir)
    cfg = load_config(run_dir / "config.toml")
    if cfg.classifier.mode == "local":
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
    held = {c for cid, e in registry["modules"].items() if cid != client for c in e["classes"]}
    orphans = sorted(c for c in registry["modules"][client]["classes"] if c not in held)
    r = Removal(run_dir, out, client, reason, before, cfg, registry, orphans)
    if orphans and orphaned == "error":
        raise FedFactoryError(f"{client} is the only holder of class(es) {', '.join(r.names[c] for c in orphans)}: "
                              "the rebuilt model could not predict them (use --orphaned drop to rebuild without them)")
    return r


def run_test_set(r: Removal) -> tuple[str, LabelledImages]:
    """The run's own test set (its source and images), never a training image; checked unchanged."""
    before, cfg = r.before, r.cfg
    by_sites = before.get("evaluation", {}).get("by") == "sites"  # then the sites evaluate the rebuilt run
    source = NO_TEST_SET if by_sites else before.get("test", {}).get("source", "")
    test = test_set_for(cfg, source)
    if not by_sites and before.get("test", {}).get("sha256") not in (None, images_digest(test)):
        raise FedFactoryError(f"the test set at {source or cfg.data.name} changed since the run was built")
    return source, test


def start_rebuild(r: Removal) -> list[GenerativeModule]:
    """The new run folder: the remaining modules, unchanged, their registry, the audit trail with the
    removal, and the config without the client; returns the remaining modules."""
    r.cfg = r.cfg.replace({"partition.exclude": sorted(set(r.cfg.partition.exclude) | {r.client}),
                           **({"factory.missing_classes": "drop"} if r.orphans else {})})
    cfg, out, entry = r.cfg, r.out, r.registry["modules"][r.client]
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(r.run_dir / "audit.jsonl", out / "audit.jsonl")
    for e in r.keep.values():
        shutil.copytree(r.run_dir / e["path"], out / e["path"])
    atomic_write_json(out / "registry.json", {"modules": r.keep})
    append_audit(out, "remove", client=r.client, sha256=entry["sha256"], reason=r.reason, orphaned_classes=r.orphans,
                 source_run=str(r.run_dir))
    atomic_write_text(out / "config.toml", dumps(cfg))
    return [load_module(out / e["path"], cfg.runtime.device, cfg.runtime.bf16) for e in r.keep.values()]


def adopt_shards(r: Removal, modules: list[GenerativeModule], num_classes: int) -> None:
    """The kept modules' synthetic draws that the new plan asks for, copied as they are: never the client's own."""
    store = shard_store(r.cfg, r.out)
    if store is not None:
        f = r.cfg.factory
        draws, _ = plan(modules, num_classes, f.per_class, f.aggregation, f.max_share)
        store.adopt(ShardStore(r.run_dir / "synthetic"), shard_keys(modules, draws, r.cfg.seed).values())


def report_section(r: Removal, results: dict) -> str:
    """The report's unlearning section: who was removed, the orphaned classes, metrics before and after."""
    lines = ["## Unlearning", "",
             f"Client **{r.client}** was removed{f' (reason: {r.reason})' if r.reason else ''}; its module "
             f"(SHA-256 `{r.registry['modules'][r.client]['sha256'][:16]}`) is not in this run. Everything below was "
             f"rebuilt from the remaining {len(r.keep)} modules with the original config and seed, which is exactly "
             "what a federation without this client would have produced.", ""]
    if r.orphans:
        lines += [f"Classes that lost their only module, now never predicted: "
                  f"**{', '.join(r.names[c] for c in r.orphans)}**.", ""]
    if results["metrics"]:
        lines += ["| metric | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {r.before['metrics'][k]:.4f} | {results['metrics'][k]:.4f} |" for k in METRICS]
    else:
        lines += ["The sites evaluate the rebuilt classifier as they did the first (`fedfactory site evaluate`, then "
                  "`fedfactory server pool`).", ""]
    return "\n".join(lines)


def unlearn(run_dir: str | Path, client: str, out: str | Path | None = None, reason: str = "",
            orphaned: str = "drop") -> dict:
    """Rebuild `run_dir` without `client` into `out` (default: RUN_DIR-without-CLIENT).

    orphaned: what to do with classes that only `client` covered: 'drop' (rebuild; they are
    never predicted) or 'error' (stop before changing anything).
    """
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir.with_name(f"{run_dir.name}-without-{client}")
    r = check_removal(run_dir, client, out, reason, orphaned)
    setup_runtime(r.cfg)
    t = time.perf_counter()
    source, test = run_test_set(r)
    modules = start_rebuild(r)
    adopt_shards(r, modules, test.num_classes)
    timings = {"data": time.perf_counter() - t}
    reference = None
    if "reference" in r.before.get("quality", {}):  # a simulated federation: its quality report's
        t = time.perf_counter()  # reference, retrained without the client's images
        reference = sites_reference(r.cfg, *prepare_data(r.cfg))
        timings["reference"] = time.perf_counter() - t
    built = build(r.cfg, modules, test, out, reference=reference)
    results = built.results(source, timings)
    before = r.before["metrics"]
    results["unlearning"] = {"client": client, "reason": reason, "orphaned_classes": r.orphans,
                             "source_run": str(run_dir), "run_dir": str(out),
                             "metrics_before": {k: before[k] for k in METRICS} if before else None}
    return write_build(out, built, results, extra=report_section(r, results))
