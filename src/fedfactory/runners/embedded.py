"""The embedded runner: the whole federation in one process.

    data -> partition -> every client fits its module -> modules/ (one round)
         -> factory (balanced synthesis) -> classifier (server or PoE) -> evaluation -> report

Each phase is a function that the Flower runner and `unlearn` call too, so a run gives the
same result whichever way it is executed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from .. import __version__
from ..classify import predict_log_proba, product_of_experts, train_classifier
from ..config import dumps
from ..data import Dataset, Partition, load_dataset, make_partition
from ..errors import FedFactoryError
from ..evaluate import evaluate
from ..factory import SyntheticSet, synthesize
from ..modules import GenerativeModule, ModuleFileError, load_module, module_kinds
from ..modules.base import resolve_device, use_bf16
from ..registry import register
from ..report import confusion_png, synthetic_vs_real, write_report
from ..utils import atomic_write_bytes, atomic_write_json, atomic_write_text, derive_seed


def setup_runtime(cfg: dict) -> None:
    if cfg["runtime"]["threads"] > 0:
        torch.set_num_threads(cfg["runtime"]["threads"])


def _cap_per_class(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:k] for c in np.unique(y)]))


def prepare_data(cfg: dict) -> tuple[Dataset, Partition]:
    """Load the data set (capped per class for toy runs) and partition it over the clients."""
    d = cfg["data"]
    ds = load_dataset(d["name"], root=d["root"], size=d["size"], download=d["download"])
    if d["train_per_class"] > 0:
        keep = _cap_per_class(ds.y_train, d["train_per_class"], derive_seed(cfg["seed"], "subsample", "train"))
        ds.x_train, ds.y_train = ds.x_train[keep], ds.y_train[keep]
        if ds.groups_train is not None:
            ds.groups_train = ds.groups_train[keep]
    if d["test_per_class"] > 0:
        keep = _cap_per_class(ds.y_test, d["test_per_class"], derive_seed(cfg["seed"], "subsample", "test"))
        ds.x_test, ds.y_test = ds.x_test[keep], ds.y_test[keep]
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


# Module config keys whose 0 means "the preset's value": the cpu and gpu presets differ here.
FROM_PRESET_IF_ZERO = ("budget_images", "batch_size", "lr", "ema_halflife_images", "sample_steps", "sigma_min")


def new_module(cfg: dict, client_id: str) -> GenerativeModule:
    m = cfg["module"]
    cls = module_kinds()[m["kind"]]
    arch = {k: m[k] for k in ("channels", "channel_mult", "num_blocks", "attn_resolutions", "dropout")
            if k in cls.presets[m["preset"]]["arch"] and m[k] not in (0, [], [-1], -1.0)}
    train = {k: v for k, v in m.items() if k in cls.presets[m["preset"]]["train"] and not (k in FROM_PRESET_IF_ZERO and v == 0)}
    return cls(arch, train, client_id=client_id, seed=cfg["seed"], preset=m["preset"],
               device=cfg["runtime"]["device"], bf16=cfg["runtime"]["bf16"], progress=cfg["runtime"]["progress"],
               compile=cfg["runtime"]["compile"])


def train_client(cfg: dict, ds: Dataset, part: Partition, client_id: str) -> GenerativeModule:
    """What one client does: fit its generative module on its own real images only."""
    idx = part.indices[client_id]
    return new_module(cfg, client_id).fit(ds.x_train[idx], ds.y_train[idx])


def _reusable(path: Path, cfg: dict, part: Partition, cid: str) -> GenerativeModule | None:
    """A module already in the run folder that verifies and matches this client's data and config."""
    try:
        m = load_module(path, device=cfg["runtime"]["device"], bf16=cfg["runtime"]["bf16"])
    except ModuleFileError:
        return None
    counts = part.counts[cid]
    expected = [c for c, n in enumerate(counts) if n > 0]
    fresh = new_module(cfg, cid)
    if (m.kind != cfg["module"]["kind"] or m.classes != expected or m.counts != [counts[c] for c in expected]
            or m.arch != fresh.arch or m.seed != cfg["seed"]
            or any(m.train_cfg.get(k) != v for k, v in fresh.train_cfg.items())):
        return None
    return m


def _train_in_worker(cfg: dict, cid: str, path: str) -> dict:
    """A client's training in its own process (the sites of a federation are independent)."""
    setup_runtime(cfg)
    ds, part = prepare_data(cfg)
    return train_client(cfg, ds, part, cid).save(path)


def train_modules(cfg: dict, ds: Dataset, part: Partition, run_dir: Path, resume: bool) -> list[GenerativeModule]:
    """Every client's module, trained here or reused (resume); `runtime.parallel_clients` > 1
    trains that many clients at once in separate processes, each with its share of the threads."""
    todo, modules = [], {}
    for cid in part.clients:
        path = run_dir / "modules" / cid
        m = _reusable(path, cfg, part, cid) if resume and path.exists() else None
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
            m = train_client(cfg, ds, part, cid)
            register(run_dir, m.save(run_dir / "modules" / cid))
            modules[cid] = m
            bar.update(1)
    bar.close()
    for cid in todo:
        if cid not in modules:
            modules[cid] = load_module(run_dir / "modules" / cid, rt["device"], rt["bf16"])
    return [modules[cid] for cid in part.clients]


def module_summary(run_dir: Path, modules: list[GenerativeModule]) -> list[dict]:
    return [{"client": m.client_id, "classes": m.classes, "counts": m.counts,
             "sha256": m.saved_manifest["weights_sha256"],
             "bytes": (run_dir / "modules" / m.client_id / "module.safetensors").stat().st_size,
             "train_stats": m.stats} for m in modules]


def _classifier_kw(cfg: dict, ds: Dataset) -> dict:
    device = resolve_device(cfg["runtime"]["device"])
    policy = ds.augment if cfg["classifier"]["augment"] == "auto" else cfg["classifier"]["augment"]
    return dict(augment_policy=policy, device=device, bf16=use_bf16(device, cfg["runtime"]["bf16"]),
                progress=cfg["runtime"]["progress"])


def train_local_expert(cfg: dict, ds: Dataset, part: Partition, cid: str, synth: SyntheticSet):
    """What a client does in local mode: a classifier on its own real images plus synthetic images
    of the classes it lacks (those come only from the other clients' modules)."""
    idx = part.indices[cid]
    lacking = ~np.isin(synth.labels, np.unique(ds.y_train[idx]))
    x = np.concatenate([ds.x_train[idx], synth.images[lacking]])
    y = np.concatenate([ds.y_train[idx], synth.labels[lacking]])
    return train_classifier(x, y, ds.num_classes, cfg["classifier"], cfg["seed"], cid, **_classifier_kw(cfg, ds))


def classify(cfg: dict, ds: Dataset, part: Partition, synth: SyntheticSet,
             experts: dict | None = None) -> tuple[np.ndarray, dict, dict]:
    """Train the classifier(s); return log-probabilities on the real test set, stats, and the networks.

    In local mode, `experts` holds classifiers the sites already trained (the Flower runner).
    """
    kw = _classifier_kw(cfg, ds)
    device, bf16 = kw["device"], kw["bf16"]
    if cfg["classifier"]["mode"] == "server":
        net, stats = train_classifier(synth.images, synth.labels, ds.num_classes, cfg["classifier"], cfg["seed"],
                                      "server", **kw)
        return predict_log_proba(net, ds.x_test, device, bf16), {"server": stats}, {"server": net}
    # local mode: one expert per client, combined as a Product of Experts at test time
    nets, stats = {}, {}
    for cid in part.clients:
        if experts and cid in experts:
            nets[cid], stats[cid] = experts[cid], {"trained_at": "site"}
        else:
            nets[cid], stats[cid] = train_local_expert(cfg, ds, part, cid, synth)
    log_probas = [predict_log_proba(nets[cid], ds.x_test, device, bf16) for cid in part.clients]
    return product_of_experts(log_probas), stats, nets


def build(cfg: dict, ds: Dataset, part: Partition, modules: list[GenerativeModule], run_dir: Path,
          timings: dict, experts: dict | None = None) -> dict:
    """From the uploaded modules onwards: synthesis, classifier, evaluation, report, results.json."""
    f, progress = cfg["factory"], cfg["runtime"]["progress"]
    t = time.perf_counter()
    synth = synthesize(modules, ds.num_classes, f["per_class"], cfg["seed"], f["aggregation"], f["missing_classes"],
                       ds.class_names, progress=progress)
    timings["synthesis"] = time.perf_counter() - t
    t = time.perf_counter()
    log_proba, clf_stats, nets = classify(cfg, ds, part, synth, experts)
    for name, net in nets.items():  # the classifiers are the product: keep their weights (safetensors)
        atomic_write_bytes(run_dir / "classifiers" / f"{name}.safetensors", save_safetensors(net.state_dict()))
    if synth.missing_classes:  # a class no module covers is never predicted
        log_proba[:, synth.missing_classes] = -np.inf
        log_proba -= np.logaddexp.reduce(log_proba, axis=1, keepdims=True)
    timings["classifier"] = time.perf_counter() - t
    metrics = evaluate(ds.y_test, log_proba, ds.num_classes)
    mods = module_summary(run_dir, modules)
    results = {
        "library_version": __version__, "config": cfg,
        "dataset": {"name": ds.name, "image_shape": list(ds.image_shape), "class_names": ds.class_names,
                    "train_images": int(sum(len(i) for i in part.indices.values())), "test_images": len(ds.y_test)},
        "metrics": metrics,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "clients": part.counts, "modules": mods,
        "missing_classes": synth.missing_classes,
        "synthetic": {"images": len(synth.labels), "sha256": synth.digest(), "per_class": np.bincount(synth.labels, minlength=ds.num_classes).tolist(),
                      "sources": synth.sources},
        "classifier": clf_stats,
        "communication": {"rounds": 1, "uploaded_bytes": sum(m["bytes"] for m in mods),
                          # local mode: every client downloads the other clients' modules
                          "downloaded_bytes": sum(m["bytes"] for m in mods) * (len(mods) - 1)
                          if cfg["classifier"]["mode"] == "local" else 0},
    }
    synthetic_vs_real(run_dir / "samples.png", synth.images, synth.labels, ds.x_test, ds.y_test, ds.num_classes)
    confusion_png(run_dir / "confusion.png", metrics["confusion_matrix"], ds.class_names,
                  f"{ds.name} {cfg['classifier']['mode']} mode: accuracy {metrics['accuracy']:.3f}")
    atomic_write_json(run_dir / "results.json", results)
    write_report(run_dir, results, ds.class_names)
    return results


def check_new_run_dir(run_dir: Path) -> None:
    """Never write over a finished or half-finished run: that would lose work."""
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FedFactoryError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")


def run(cfg: dict, run_dir: str | Path, resume: bool = False) -> dict:
    """The whole pipeline, writing into run_dir; `resume` reuses verified modules already there."""
    run_dir = Path(run_dir)
    if not resume:
        check_new_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and (run_dir / "config.toml").exists():
        old = (run_dir / "config.toml").read_text()
        if old != dumps(cfg):
            atomic_write_text(run_dir / "config.previous.toml", old)
    atomic_write_text(run_dir / "config.toml", dumps(cfg))
    setup_runtime(cfg)
    timings = {}
    t = time.perf_counter()
    ds, part = prepare_data(cfg)
    timings["data"] = time.perf_counter() - t
    t = time.perf_counter()
    modules = train_modules(cfg, ds, part, run_dir, resume)
    timings["modules"] = time.perf_counter() - t
    return build(cfg, ds, part, modules, run_dir, timings)


def load_results(run_dir: Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.exists():
        raise FedFactoryError(f"{path} not found: is {run_dir} a finished fedfactory run?")
    return json.loads(path.read_text())
