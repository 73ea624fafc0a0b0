"""The embedded runner: a whole federation simulated in one process.

    public data set -> partition -> N simulated sites, each with its share only (site.py)
                    -> modules/ (one round) -> the server: factory, classifier, evaluation (server.py)

It only orchestrates: the sites and the server are the same code that `fedfactory site train`,
`fedfactory server build` and the Flower apps call, so every path gives the same bits.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import Dataset, Partition, cap_per_class, load_dataset, make_partition
from ..errors import FedFactoryError
from ..modules import GenerativeModule, ModuleFileError, load_module
from ..registry import register
from ..runtime import setup_runtime
from ..factory import SyntheticSet
from ..server import build, evaluation_split, start_run, synthesize_all
from ..privacy.audit import holdout_split
from ..site import POLICY, check_upload, new_module, save_audit_report, train_expert, train_module
from ..utils import derive_seed


def prepare_data(cfg: dict) -> tuple[Dataset, Partition]:
    """Load the public data set (capped per class for toy runs) and partition it over simulated sites."""
    d = cfg["data"]
    ds = load_dataset(d["name"], root=d["root"], size=d["size"], download=d["download"])
    if d["classes"] and d["classes"] != ds.class_names:
        raise FedFactoryError(f"data.classes {d['classes']} differs from {ds.name}'s classes {ds.class_names}")
    if d["train_per_class"] > 0:
        keep = cap_per_class(ds.y_train, d["train_per_class"], derive_seed(cfg["seed"], "subsample", "train"))
        ds.x_train, ds.y_train = ds.x_train[keep], ds.y_train[keep]
        if ds.groups_train is not None:
            ds.groups_train = ds.groups_train[keep]
    p = cfg["partition"]
    part = make_partition(ds.y_train, p["scheme"], p["clients"], seed=cfg["seed"], num_classes=ds.num_classes,
                          groups=ds.groups_train, min_size=p["min_size"])
    unknown = sorted(set(p["exclude"]) - set(part.clients))
    if unknown:
        raise FedFactoryError(f"partition.exclude names unknown clients {unknown}; clients are {part.clients}")
    for cid in p["exclude"]:
        del part.indices[cid], part.counts[cid]
    if not part.indices:
        raise FedFactoryError("partition.exclude leaves no client in the federation")
    return ds, part


def site_data(ds: Dataset, part: Partition, cid: str):
    """What a simulated site holds: its share of the training set, nothing else."""
    idx = part.indices[cid]
    return ds.x_train[idx], ds.y_train[idx]


def _reusable(path: Path, cfg: dict, labels, cid: str) -> GenerativeModule | None:
    """A module already in the run folder that verifies and matches this client's data (less its
    held-out share) and config, its privacy settings included."""
    try:
        m = load_module(path, device=cfg["runtime"]["device"], bf16=cfg["runtime"]["bf16"])
    except ModuleFileError:
        return None
    pv = cfg["privacy"]
    train, held = holdout_split(labels, pv["holdout"], cfg["seed"], cid)
    classes, counts = (v.tolist() for v in np.unique(labels[train], return_counts=True))
    fresh = new_module(cfg, cid)
    audit = m.privacy.get("audit", {})
    if (m.kind != cfg["module"]["kind"] or m.classes != classes or m.counts != counts
            or m.arch != fresh.arch or m.seed != cfg["seed"]
            or any(m.train_cfg.get(k) != v for k, v in fresh.train_cfg.items())
            or bool(len(held)) != bool(audit) or audit.get("policy", {}) != ({k: pv[k] for k in POLICY} if audit else {})
            or bool(fresh.dp) != ("dp" in m.privacy)):
        return None
    return m


def _train_in_worker(cfg: dict, cid: str, path: str) -> dict:
    """A site's training in its own process (the sites of a federation are independent)."""
    setup_runtime(cfg)
    ds, part = prepare_data(cfg)
    module = train_module(cfg, cid, *site_data(ds, part, cid))
    manifest = module.save(path)
    save_audit_report(module, audit_dir(Path(path).parents[1], cid))
    return manifest


def audit_dir(run_dir: Path, cid: str) -> Path:
    """Where a simulated site keeps its own audit report: beside the modules, never inside one."""
    return run_dir / "site-audits" / cid


def train_modules(cfg: dict, ds: Dataset, part: Partition, run_dir: Path, resume: bool) -> list[GenerativeModule]:
    """Every site's module, trained here or reused (resume); `runtime.parallel_clients` > 1
    trains that many sites at once in separate processes, each with its share of the threads."""
    todo, modules = [], {}
    for cid in part.clients:
        path = run_dir / "modules" / cid
        m = _reusable(path, cfg, ds.y_train[part.indices[cid]], cid) if resume and path.exists() else None
        if m is None:
            todo.append(cid)
        else:
            modules[cid] = m
    rt = cfg["runtime"]
    bar = tqdm(total=len(todo), desc="client modules", unit="client", disable=not rt["progress"], dynamic_ncols=True)
    workers = min(rt["parallel_clients"], len(todo))
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        sub = {**cfg, "runtime": {**rt, "progress": False,
                                  "threads": rt["threads"] or max(1, torch.get_num_threads() // workers)}}
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {cid: pool.submit(_train_in_worker, sub, cid, str(run_dir / "modules" / cid)) for cid in todo}
            for cid in todo:  # registered in client order, whatever order they finish in
                register(run_dir, futures[cid].result())
                bar.update(1)
    else:
        for cid in todo:
            m = train_module(cfg, cid, *site_data(ds, part, cid))
            register(run_dir, m.save(run_dir / "modules" / cid))
            save_audit_report(m, audit_dir(run_dir, cid))
            modules[cid] = m
            bar.update(1)
    bar.close()
    for cid in todo:
        if cid not in modules:
            modules[cid] = load_module(run_dir / "modules" / cid, rt["device"], rt["bf16"])
    for cid in part.clients:  # every site trains before one that failed its audit stops the run
        check_upload(cfg, modules[cid], kept_at=f"{run_dir / 'modules' / cid} and {audit_dir(run_dir, cid)}")
    return [modules[cid] for cid in part.clients]


def train_experts(cfg: dict, ds: Dataset, part: Partition, synth: SyntheticSet) -> dict:
    """Local mode: every simulated site trains its expert from its own images and the others' modules.

    A site uses synthetic images only of the classes it lacks, which only the other modules cover, and
    every (module, class) pair has its own stream: so one synthesis from all modules gives each site
    exactly what synthesize_for_site(others) gives it, and the factory runs once instead of once per site.
    """
    experts = {}
    for cid in part.clients:
        try:
            experts[cid] = train_expert(cfg, cid, *site_data(ds, part, cid), ds.num_classes, synth, ds.augment)
        except FedFactoryError as e:  # as in a real federation: the server goes on without it, or fails
            print(f"fedfactory: site {cid}: no expert: {e}", flush=True)
    return experts


def run(cfg: dict, run_dir: str | Path, resume: bool = False) -> dict:
    """The whole federation, simulated, writing into run_dir; `resume` reuses verified modules already there."""
    run_dir = Path(run_dir)
    start_run(cfg, run_dir, resume)
    setup_runtime(cfg)
    timings = {}
    t = time.perf_counter()
    ds, part = prepare_data(cfg)
    timings["data"] = time.perf_counter() - t
    t = time.perf_counter()
    modules = train_modules(cfg, ds, part, run_dir, resume)
    timings["modules"] = time.perf_counter() - t
    experts = synth = None
    if cfg["classifier"]["mode"] == "local":
        t = time.perf_counter()
        synth = synthesize_all(cfg, modules, ds.num_classes, ds.class_names)
        timings["synthesis"] = time.perf_counter() - t
        t = time.perf_counter()
        experts = train_experts(cfg, ds, part, synth)
        timings["experts"] = time.perf_counter() - t
    return build(cfg, modules, evaluation_split(cfg, ds), run_dir, timings, experts=experts, synth=synth)
