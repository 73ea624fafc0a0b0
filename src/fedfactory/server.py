"""What the server (the coordinator) does: it holds the sites' modules and, maybe, a test set; never
a training image.

    check_new_run_dir(run_dir)
    test = test_set_for(cfg, "/data/test")                      # or "none": the sites evaluate
    modules = [receive_module(run_dir, d) for d in module_dirs]   # verified, registered
    built = build(cfg, modules, test, run_dir)                    # synthesis, classifier, evaluation: computed
    results = write_build(run_dir, built, built.results(source, timings))  # results.json, model, report, pictures
    results = pool_site_evaluations(run_dir, answers)             # the sites' counts on their own test images

In local mode the sites send their expert classifiers; a site with no expert is left out of the
Product of Experts or fails the run (`classifier.missing_experts`). Nothing is ever trained here
from a site's data.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .classify import classifier_to_bytes, train_classifier
from .classify.model import FederatedClassifier, select_experts
from .config import Config, dumps
from .data import Dataset, LabelledImages, cap_per_class, load_dataset
from .data.folder import load_labelled
from .errors import FedFactoryError
from .evaluate import check_counts, evaluate, pooled_metrics
from .crosscheck import cross_check, excluded_draws
from .factory import ShardStore, SyntheticSet, synthesize
from .modules import GenerativeModule, load_module
from .modules.fileformat import WEIGHTS, write_module_dir
from .modules.limits import Limits
from .privacy import AUDIT_FRACTIONS
from .quality import quality_report
from .registry import register
from .roster import check_agreement, load_roster
from .report import CURVES, confusion_png, curve_rows, synthetic_vs_real, write_curves, write_report
from .runtime import classifier_kw
from .utils import atomic_write_bytes, atomic_write_json, atomic_write_text, derive_seed

MODEL = "model.safetensors"  # the run's classifier, self-describing (classify/model.py)


def check_new_run_dir(run_dir: Path) -> None:
    """Never write over a finished or half-finished run: that would lose work."""
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FedFactoryError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")


def start_run(cfg: Config, run_dir: Path, resume: bool = False) -> None:
    """Create the run folder and record the config (a changed config on resume keeps the old one beside)."""
    if not resume:
        check_new_run_dir(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume:  # a run killed mid-write leaves its atomic writes' temporary files; none is ever read
            for stale in sorted(run_dir.rglob(".*.tmp"), reverse=True):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
        if resume and (run_dir / "config.toml").exists():
            old = (run_dir / "config.toml").read_text()
            if old != dumps(cfg):
                atomic_write_text(run_dir / "config.previous.toml", old)
        atomic_write_text(run_dir / "config.toml", dumps(cfg))
    except OSError as e:
        raise FedFactoryError(f"cannot write the run folder {run_dir}: {e.strerror or e}") from None


def evaluation_split(cfg: Config, ds: Dataset) -> LabelledImages:
    """A loaded data set's test split, capped per class as configured."""
    d = cfg.data
    if d.classes and d.classes != ds.class_names:
        raise FedFactoryError(f"data.classes {d.classes} differs from {ds.name}'s classes {ds.class_names}")
    x, y = ds.x_test, ds.y_test
    if d.test_per_class > 0:
        keep = cap_per_class(y, d.test_per_class, derive_seed(cfg.seed, "subsample", "test"))
        x, y = x[keep], y[keep]
    return LabelledImages(ds.name, x, y, list(ds.class_names), ds.augment)


def load_test_set(cfg: Config, source: str = "") -> LabelledImages:
    """The server's test set: `source` (a class-per-folder directory, a CSV of path,label or an .npz of
    test images; or a data set name), or, when empty, the config's data set's test split."""
    d = cfg.data
    if not source:
        return evaluation_split(cfg, load_dataset(d.name, root=d.root, size=d.size, download=d.download))
    if Path(source).exists():
        if not d.classes:
            raise FedFactoryError(f"a test set from {source} needs the federation's class list: set data.classes")
        x, y = load_labelled(source, d.classes, split="test", size=d.size, channels=d.channels)
        return LabelledImages(Path(source).name, x, y, list(d.classes))
    return evaluation_split(cfg.replace({"data.test_per_class": 0}), load_dataset(source, size=d.size))


NO_TEST_SET = "none"  # a coordinator with no test images: the sites evaluate the classifier (federated)


def no_test_set(cfg: Config) -> LabelledImages:
    """What a coordinator without test images knows of them: the class list and the image shape, both
    from the consortium's config. The sites evaluate the classifier on their own images."""
    d = cfg.data
    if not d.classes or d.size <= 0 or d.channels not in (1, 3):
        raise FedFactoryError("a coordinator without a test set takes the images' shape and classes from the config: "
                              "set data.classes, data.size and data.channels (1 or 3), or give a test set")
    return LabelledImages(NO_TEST_SET, np.zeros((0, d.size, d.size, d.channels), np.uint8),
                          np.zeros(0, np.int64), list(d.classes))


def test_set_for(cfg: Config, source: str) -> LabelledImages:
    """The coordinator's test set, or, for source "none", none (see no_test_set)."""
    return no_test_set(cfg) if source == NO_TEST_SET else load_test_set(cfg, source)


def module_limits(cfg: Config, test: LabelledImages) -> Limits:
    """What the server accepts from a site: the federation's caps, image shape and class count."""
    return Limits.from_config(cfg.federation, test.image_shape, test.num_classes)


def receive_module(run_dir: Path, source: Path, limits: Limits, device: str = "cpu", origin: str = "") -> GenerativeModule:
    """Verify a module folder gathered from a site (file transfer, carried disk), copy it into the run
    byte for byte and register it."""
    module = load_module(source, device=device, limits=limits)
    manifest = module.saved_manifest
    target = run_dir / "modules" / manifest["client_id"]
    if target.exists():
        raise FedFactoryError(f"two modules claim client id {manifest['client_id']!r} (the second is {source})")
    write_module_dir(target, (Path(source) / WEIGHTS).read_bytes(), manifest)
    register(run_dir, manifest, source=origin or f"folder {Path(source).resolve()}")
    return load_module(target, device=device, limits=limits)


def images_digest(test: LabelledImages) -> str:
    return hashlib.sha256(test.images.tobytes() + test.labels.tobytes()).hexdigest()


def check_audit(cfg: Config, module: GenerativeModule) -> None:
    """Under privacy.enforce a module is refused when its site audit failed, or when it has none although
    the federation asks for one (privacy.holdout > 0): its site should not have sent it."""
    if not cfg.privacy.enforce:
        return
    a = module.privacy.get("audit")
    if not a and cfg.privacy.holdout > 0:
        raise FedFactoryError(f"module {module.client_id} carries no privacy audit, and the federation asks every "
                              "site for one (privacy.holdout > 0, privacy.enforce)")
    if a and a.get("passed") is not True:
        raise FedFactoryError(f"module {module.client_id} failed its site's privacy audit "
                              f"({'; '.join(map(str, a.get('reasons', [])))[:300]}); privacy.enforce refuses it")


def federation_roster(cfg: Config, test: LabelledImages):
    """The consortium's agreement (federation.roster), or None."""
    return load_roster(cfg.federation.roster, test.class_names) if cfg.federation.roster else None


def check_module(cfg: Config, m: GenerativeModule, test: LabelledImages, roster=None) -> None:
    """A module must draw images of the federation's shape, of classes in its list and within its site's
    agreement (the roster), and must carry a passed privacy audit (privacy.enforce)."""
    check_audit(cfg, m)
    if tuple(m.image_shape) != test.image_shape:
        raise FedFactoryError(f"module {m.client_id} makes {list(m.image_shape)} images, the test set "
                              f"holds {list(test.image_shape)}: check data.size and data.channels")
    if any(not 0 <= c < test.num_classes for c in m.classes):
        raise FedFactoryError(f"module {m.client_id} covers class ids {m.classes}, outside the federation's "
                              f"{test.num_classes} classes")
    check_agreement(roster, m)


def check_modules(cfg: Config, modules: list[GenerativeModule], test: LabelledImages) -> None:
    roster = federation_roster(cfg, test)
    for m in modules:
        check_module(cfg, m, test, roster)


def privacy_numbers(block: dict) -> dict:
    """A module's privacy block as the server reports it: the audit's pooled numbers and the DP terms."""
    audit = {k: v for k, v in block.get("audit", {}).items() if k in AUDIT_FRACTIONS or k in ("passed", "holdout")}
    return {**({"audit": audit} if audit else {}), **({"dp": block["dp"]} if "dp" in block else {})}


def shard_store(cfg: Config, run_dir: Path | None) -> ShardStore | None:
    """The run's kept synthetic draws (RUN_DIR/synthetic/), unless factory.keep_shards is off."""
    return ShardStore(Path(run_dir) / "synthetic") if run_dir is not None and cfg.factory.keep_shards else None


def synthesize_all(cfg: Config, modules: list[GenerativeModule], num_classes: int, class_names: list[str],
                   run_dir: Path | None = None):
    """The factory: a class-balanced synthetic set from every module, after the modules that share a class
    have checked each other (factory.check_samples; factory.outliers decides whether the flagged are
    dropped); with a run_dir, draws kept there (a resumed or unlearned run) are taken from it."""
    f = cfg.factory
    report = cross_check(modules, num_classes, f.check_samples, cfg.seed)
    excluded = excluded_draws(report, modules) if f.outliers == "drop" else set()
    synth = synthesize(modules, num_classes, f.per_class, cfg.seed, f.aggregation, f.missing_classes,
                       class_names, progress=cfg.runtime.progress, store=shard_store(cfg, run_dir),
                       max_share=f.max_share, excluded=excluded)
    synth.crosscheck = {**report, "dropped": sorted([cid, c] for cid, c in excluded)} if report["checked"] else {}
    return synth


@dataclass
class Build:
    """What the server computes from the modules (see build); nothing of it is in a run folder until
    write_build puts it there."""
    cfg: Config
    test: LabelledImages
    modules: list[GenerativeModule]  # by client id
    module_bytes: dict[str, int]     # client id -> size of the weights file it uploaded
    synth: SyntheticSet
    classifier: FederatedClassifier
    model_bytes: bytes               # the classifier file, as every site receives it
    train_stats: dict                # network name -> how it was trained
    metrics: dict | None             # on the coordinator's test set; None without one (the sites evaluate)
    quality: dict
    reference: object = None         # the quality report's feature network (a simulated federation's)
    timings: dict = field(default_factory=dict)  # seconds: synthesis (when made here), classifier, quality
    curves: list = field(default_factory=list)   # the classifiers' training loss: curves.csv rows

    def results(self, test_source: str = "", timings: dict | None = None) -> dict:
        """results.json: `test_source` as the caller named the test set ("" for the config's data set),
        `timings` the caller's own steps (data, modules, ...), before the build's."""
        cfg, test, synth, num_classes = self.cfg, self.test, self.synth, self.test.num_classes
        mods = [{"client": m.client_id, "classes": m.classes, "counts": m.counts,
                 "sha256": m.saved_manifest["weights_sha256"], "bytes": self.module_bytes[m.client_id],
                 "train_stats": m.stats, "privacy": privacy_numbers(m.privacy)}
                for m in self.modules]
        clients = {m.client_id: [m.counts[m.classes.index(c)] if c in m.classes else 0 for c in range(num_classes)]
                   for m in self.modules}
        return {
            "library_version": __version__, "config": cfg.to_dict(),
            "dataset": {"name": (test.name if test_source != NO_TEST_SET else "sites' own data") if test_source
                        else cfg.data.name,
                        # a simulated federation partitions a public data set; otherwise each site had its own
                        "partition": "sites' own data" if test_source else cfg.partition.scheme,
                        "image_shape": list(test.image_shape), "class_names": test.class_names,
                        "train_images": int(sum(map(sum, clients.values()))), "test_images": len(test.labels)},
            "test": {"source": test_source, "name": test.name, "images": len(test.labels),
                     "sha256": images_digest(test)},
            "metrics": self.metrics,
            "evaluation": {"by": "coordinator" if self.metrics else "sites", "sites": {}},
            "model": {"file": MODEL, "sha256": hashlib.sha256(self.model_bytes).hexdigest()},
            "timings": {k: round(v, 2) for k, v in {**(timings or {}), **self.timings}.items()},
            "clients": clients, "modules": mods,
            "missing_classes": synth.missing_classes,
            "synthetic": {"images": len(synth.labels), "sha256": synth.digest(),
                          "per_class": np.bincount(synth.labels, minlength=num_classes).tolist(),
                          "sources": synth.sources},
            "classifier": self.train_stats,
            "quality": self.quality,
            "crosscheck": synth.crosscheck,
            "agreement": cfg.federation.roster or None,
            "communication": {"rounds": 1, "uploaded_bytes": sum(m["bytes"] for m in mods),
                              # local mode: every site downloads the other sites' modules
                              "downloaded_bytes": sum(m["bytes"] for m in mods) * (len(mods) - 1)
                              if cfg.classifier.mode == "local" else 0},
        }


def train_networks(cfg: Config, modules: list[GenerativeModule], synth: SyntheticSet, test: LabelledImages,
                   experts: dict | None) -> tuple[dict, dict]:
    """The classifier's networks and their training stats, by name: the server's own, trained on the
    synthetic set (server mode), or the sites' experts (local mode; see select_experts)."""
    if cfg.classifier.mode == "server":
        net, stats = train_classifier(synth.images, synth.labels, test.num_classes, cfg.classifier, cfg.seed,
                                      "server", **classifier_kw(cfg, test.augment))
        return {"server": net}, {"server": stats}
    chosen = select_experts(experts or {}, [m.client_id for m in modules], cfg.classifier.missing_experts)
    return {cid: net for cid, (net, _) in chosen.items()}, {cid: s for cid, (_, s) in chosen.items()}


def measure_quality(cfg: Config, reference, synth: SyntheticSet, test: LabelledImages) -> dict:
    """results.json's quality block: every module's images against the real ones, in the features of
    `reference` (a classifier trained on real training data); a note when there is none or it fails."""
    if reference is None:
        return {"note": "not measured: it needs a classifier trained on real training data, which only a "
                        "simulated federation has (quality.reference_budget > 0)"}
    try:
        return quality_report(cfg, reference, synth, test, classifier_kw(cfg, test.augment))
    except Exception as e:  # the report describes the run; a failure in it must not lose the trained classifier
        note = f"not measured: the quality report failed ({type(e).__name__}: {str(e)[:300]})"
        print(f"fedfactory: warning: {note}; the run's results are kept", file=sys.stderr)
        return {"note": note}


def build(cfg: Config, modules: list[GenerativeModule], test: LabelledImages, run_dir: Path, *,
          experts: dict | None = None, synth: SyntheticSet | None = None, reference=None) -> Build:
    """From the uploaded modules onwards: synthesis, classifier, evaluation and quality, computed and
    returned; write_build puts them into the run folder.

    run_dir: where the modules were received (and the kept synthetic draws are). experts (local mode):
    client id -> (network, stats) as the sites trained them. synth: the factory's set when the caller
    already made it from these modules. reference: a classifier trained on real training data (a
    simulated federation's), whose features measure each module.
    """
    modules = sorted(modules, key=lambda m: m.client_id)
    check_modules(cfg, modules, test)
    timings = {}
    if synth is None:
        t = time.perf_counter()
        synth = synthesize_all(cfg, modules, test.num_classes, test.class_names, run_dir)
        timings["synthesis"] = time.perf_counter() - t
    t = time.perf_counter()
    nets, train_stats = train_networks(cfg, modules, synth, test, experts)
    # the loss curves go to curves.csv, not into results.json's stats
    curves = sum((curve_rows(f"classifier/{name}", s.pop("curve", [])) for name, s in train_stats.items()), [])
    c = cfg.classifier
    model = FederatedClassifier(nets, test.class_names, test.image_shape, c.mode, synth.missing_classes,
                                c.preset, c.width)
    metrics = None
    if len(test.labels):
        kw = classifier_kw(cfg, test.augment)
        metrics = evaluate(test.labels, model.predict_log_proba(test.images, kw["device"], kw["bf16"]),
                           test.num_classes)
    timings["classifier"] = time.perf_counter() - t
    t = time.perf_counter()
    quality = measure_quality(cfg, reference, synth, test)
    if reference is not None:
        timings["quality"] = time.perf_counter() - t
    sizes = {m.client_id: (Path(run_dir) / "modules" / m.client_id / WEIGHTS).stat().st_size for m in modules}
    return Build(cfg, test, modules, sizes, synth, model, model.to_bytes(), train_stats, metrics, quality, reference,
                 timings, curves)


def write_build(run_dir: Path, built: Build, results: dict, extra: str = "", module_curves: list = ()) -> dict:
    """A build into its run folder: every network's weights (classifiers/), the classifier file that goes
    back to the sites (model.safetensors), the pictures, results.json, report.md (`extra`: more of it) and
    curves.csv (the classifiers' loss after `module_curves`, the rows of the modules trained here)."""
    if built.curves or module_curves:
        write_curves(Path(run_dir) / CURVES, [*module_curves, *built.curves])
    for name, net in built.classifier.nets.items():  # the classifiers are the product: keep their weights
        atomic_write_bytes(run_dir / "classifiers" / f"{name}.safetensors", classifier_to_bytes(net, name))
    atomic_write_bytes(run_dir / MODEL, built.model_bytes)
    if built.reference is not None:
        atomic_write_bytes(run_dir / "classifiers" / "reference.safetensors",
                           classifier_to_bytes(built.reference, "reference"))
    synth, test = built.synth, built.test
    synthetic_vs_real(run_dir / "samples.png", synth.images, synth.labels, test.images, test.labels, test.num_classes)
    return write_results(run_dir, results, extra)


def write_results(run_dir: Path, results: dict, extra: str = "") -> dict:
    """results.json, report.md (`extra`: more of it) and, once there are metrics, the confusion matrix picture."""
    m, names = results["metrics"], results["dataset"]["class_names"]
    if m:
        confusion_png(run_dir / "confusion.png", m["confusion_matrix"], names,
                      f"{results['dataset']['name']} {results['config']['classifier']['mode']} mode: "
                      f"accuracy {m['accuracy']:.3f}")
    atomic_write_json(run_dir / "results.json", results)
    write_report(run_dir, results, names, extra=extra)
    return results


def pool_site_evaluations(run_dir: Path, answers: dict[str, dict]) -> dict:
    """The sites' evaluations (client id -> site_counts; from peers, so checked) into the run's results:
    each site's metrics, test images and counts, and, when the coordinator has no test set, the metrics
    pooled over every site that answered (a site that answers again replaces its earlier answer)."""
    results = load_results(run_dir)
    k, model_sha = len(results["dataset"]["class_names"]), results["model"]["sha256"]
    sites = results["evaluation"]["sites"]
    for cid, counts in sorted(answers.items()):
        where = f"the evaluation of site {cid}"
        claim = counts.get("model_sha256") if isinstance(counts, dict) else None
        if claim != model_sha:
            raise FedFactoryError(f"{where} is of another classifier (model_sha256 {str(claim)[:16]}..., this "
                                  f"run's is {model_sha[:16]}...)")
        checked = check_counts(counts, k, where)
        with warnings.catch_warnings():  # a site that tests on its own classes only: sklearn says so, expectedly
            warnings.simplefilter("ignore", UserWarning)
            sites[cid] = {"images": int(checked[0].sum()), "metrics": pooled_metrics([checked], k), "counts": counts}
    if results["evaluation"]["by"] == "sites":
        if not sites:
            raise FedFactoryError("no site sent an evaluation, so the run has no metrics: give a site test images, "
                                  "or the coordinator a test set")
        results["metrics"] = pooled_metrics([check_counts(s["counts"], k, c) for c, s in sorted(sites.items())], k)
        results["test"].update({"source": "sites", "name": "the sites' own test images",
                                "images": sum(s["images"] for s in sites.values())})
    return write_results(run_dir, results)


def load_results(run_dir: Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.exists():
        raise FedFactoryError(f"{path} not found: is {run_dir} a finished fedfactory run?")
    return json.loads(path.read_text())
