"""The embedded runner: a whole federation simulated in one process.

    public data set -> partition -> N simulated sites, each with its share only (site.py)
                    -> modules/ (one round) -> the server: factory, classifier, evaluation (server.py)

It only orchestrates: the sites and the server are the same code that `fedfactory site train`,
`fedfactory server build` and the Flower apps call, so every path gives the same bits.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..config import Config
from ..data import Dataset, Partition
from ..errors import FedFactoryError
from ..modules import GenerativeModule, ModuleFileError, load_module
from ..registry import register
from ..runtime import setup_runtime, site_split
from ..factory import SyntheticSet
from ..server import build, evaluation_split, start_run, synthesize_all, write_build
from ..privacy.audit import holdout_split
from ..progress import ClientProgress
from ..report import CURVES, MODULE_CURVES, curve_rows, module_curves_png, read_curves, write_curves
from ..site import POLICY, check_upload, new_module, save_audit_report, train_expert, train_module
from .common import prepare_data, site_data, sites_reference


def _reusable(path: Path, cfg: Config, labels, cid: str) -> GenerativeModule | None:
    """A module already in the run folder that verifies and matches this client's data (less its
    held-out share) and config, its privacy settings included."""
    try:
        m = load_module(path, device=cfg.runtime.device, bf16=cfg.runtime.bf16)
    except ModuleFileError:
        return None
    pv = cfg.privacy
    train, held = holdout_split(labels, pv.holdout, cfg.seed, cid)
    classes, counts = (v.tolist() for v in np.unique(labels[train], return_counts=True))
    fresh = new_module(cfg, cid)
    audit, sampling = m.privacy.get("audit", {}), set(m.sampling_keys)
    if (m.kind != cfg.module.kind or m.classes != classes or m.counts != counts
            or m.arch != fresh.arch or m.seed != cfg.seed
            or any(m.train_cfg.get(k) != v for k, v in fresh.train_cfg.items() if k not in sampling)
            or bool(len(held)) != bool(audit) or audit.get("policy", {}) != ({k: getattr(pv, k) for k in POLICY} if audit else {})
            or m.privacy.get("dp") != _dp_claim(fresh, len(train))):
        return None
    if any(m.train_cfg.get(k) != fresh.train_cfg[k] for k in sampling):
        # Only how it is sampled changed (module.sampler, sample_steps, ...): no retraining. Saved again
        # so that what reloads it (unlearn, a server build) samples it as this run does; the weights, and
        # so the registry's hash, are unchanged. Its audit stays the one measured with the old sampler.
        m.train_cfg.update({k: fresh.train_cfg[k] for k in sampling})
        m.save(path)
    return m


def _dp_claim(fresh: GenerativeModule, n: int) -> dict | None:
    """The DP claim that the config's privacy settings would make for a site of n training images
    (None without DP): a module trained at another epsilon, noise or clip is not reused."""
    if fresh.dp is None:
        return None
    from ..privacy import dp as dpsgd

    t = fresh.train_cfg
    return dpsgd.claim(dpsgd.plan(fresh.dp, n, int(t["batch_size"]), int(t["budget_images"])))


def _exit_with_parent(parent: int) -> None:
    """A worker's initializer: end when the process that started it is gone (killed, crashed), rather
    than train on as an orphan that competes for the cores and writes into the run folder."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _train_in_worker(cfg: Config, cid: str, path: str, news=None) -> tuple[dict, list]:
    """A site's training in its own process (the sites of a federation are independent): its manifest
    and loss curve; its progress goes to the `news` queue, if given, as (client, steps done, steps,
    images seen, seconds)."""
    setup_runtime(cfg)
    ds, part = prepare_data(cfg)
    tell = None if news is None else lambda *p: news.put((cid, *p))
    module = train_module(cfg, cid, *site_data(ds, part, cid), on_progress=tell)
    manifest = module.save(path)
    save_audit_report(module, audit_dir(Path(path).parents[1], cid))
    return manifest, module.curve


def audit_dir(run_dir: Path, cid: str) -> Path:
    """Where a simulated site keeps its own audit report: beside the modules, never inside one."""
    return run_dir / "site-audits" / cid


def train_modules(cfg: Config, ds: Dataset, part: Partition, run_dir: Path, resume: bool) -> list[GenerativeModule]:
    """Every site's module, trained here or reused (resume); several sites at once in separate
    processes, each with its share of the cores, as runtime.site_split decides."""
    todo, modules, curves = [], {}, {}
    for cid in part.clients:
        path = run_dir / "modules" / cid
        m = _reusable(path, cfg, ds.y_train[part.indices[cid]], cid) if resume and path.exists() else None
        if m is None:
            todo.append(cid)
        else:
            modules[cid] = m
    rt = cfg.runtime
    # disable=None: no display when stderr is not a terminal (a log file, a pipe)
    bar = tqdm(total=len(todo), desc="client modules", unit="client", disable=None if rt.progress else True,
               dynamic_ncols=True)
    workers, threads = site_split(cfg, len(todo))
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        sub = cfg.replace({"runtime.progress": False, "runtime.threads": threads})
        ctx, show = multiprocessing.get_context("spawn"), not bar.disable
        # The manager (only when shown) outlives the pool: workers may still report while it shuts down.
        with ctx.Manager() if show else contextlib.nullcontext() as manager, \
                ProcessPoolExecutor(workers, mp_context=ctx, initializer=_exit_with_parent,
                                    initargs=(os.getpid(),)) as pool:
            news = manager.Queue() if show else None  # the workers' progress (a proxy: passes to spawned workers)
            view = ClientProgress(bar, news, len(todo), workers) if show else None
            futures = {cid: pool.submit(_train_in_worker, sub, cid, str(run_dir / "modules" / cid), news)
                       for cid in todo}
            try:
                for cid in todo:  # registered in client order, whatever order they finish in
                    while view and not futures[cid].done():
                        view.poll()
                    manifest, curves[cid] = futures[cid].result()  # a worker's exception surfaces here
                    register(run_dir, manifest)
                    bar.update(1)
            finally:
                if view:
                    view.close()
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
            modules[cid] = load_module(run_dir / "modules" / cid, rt.device, rt.bf16)
            modules[cid].curve = curves[cid]
    for cid in part.clients:  # every site trains before one that failed its audit stops the run
        check_upload(cfg, modules[cid], kept_at=f"{run_dir / 'modules' / cid} and {audit_dir(run_dir, cid)}")
    return [modules[cid] for cid in part.clients]


def module_curves(run_dir: Path, modules: list[GenerativeModule]) -> list[dict]:
    """curves.csv's rows of every module; a module reused by --resume (its curve is not in its folder,
    which holds only what travels) keeps its rows of the curves.csv already in the run folder."""
    old = read_curves(run_dir / CURVES) if any(not m.curve for m in modules) else []
    rows = []
    for m in modules:
        series = f"module/{m.client_id}"
        rows += curve_rows(series, m.curve) if m.curve else [r for r in old if r["series"] == series]
    return rows


def train_experts(cfg: Config, ds: Dataset, part: Partition, synth: SyntheticSet) -> dict:
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


def run(cfg: Config, run_dir: str | Path, resume: bool = False) -> dict:
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
    curves = module_curves(run_dir, modules)
    write_curves(run_dir / CURVES, curves)  # now: a run resumed after a crash keeps them
    module_curves_png(run_dir / MODULE_CURVES, curves)
    t = time.perf_counter()
    reference = sites_reference(cfg, ds, part)
    timings["reference"] = time.perf_counter() - t
    experts = synth = None
    if cfg.classifier.mode == "local":
        t = time.perf_counter()
        synth = synthesize_all(cfg, modules, ds.num_classes, ds.class_names, run_dir)
        timings["synthesis"] = time.perf_counter() - t
        t = time.perf_counter()
        experts = train_experts(cfg, ds, part, synth)
        timings["experts"] = time.perf_counter() - t
    built = build(cfg, modules, evaluation_split(cfg, ds), run_dir, experts=experts, synth=synth, reference=reference)
    return write_build(run_dir, built, built.results(timings=timings), module_curves=curves)
