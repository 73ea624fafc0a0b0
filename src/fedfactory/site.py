"""What a site (a hospital) does, with its own images and nothing else.

    images, labels = load_site_data(cfg, "/data/hospital-3")            # its own folder
    module = train_module(cfg, "hospital-3", images, labels)           # trained, then audited
    module.save("modules/hospital-3")                                  # what may be uploaded
    save_audit_report(module, "audit/hospital-3")                      # shows patients: stays here
    check_upload(cfg, module)                                           # refused if it leaks
    # local mode only: the other sites' modules come back; the site trains its expert
    synth = synthesize_for_site(cfg, other_modules, num_classes)
    expert, stats = train_expert(cfg, "hospital-3", images, labels, num_classes, synth)
    # the classifier comes home: the site evaluates it on its own test images and sends counts only
    test_x, test_y = load_site_test(model, "/data/hospital-3-test")
    answer = evaluate_at_site(model, test_x, test_y, "hospital-3")

Labels are global class ids: a class's place in the federation's class list (`data.classes`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import Config, RuntimeConfig
from .classify import train_classifier
from .classify.model import FederatedClassifier
from .data.folder import load_labelled
from .errors import FedFactoryError
from .evaluate import site_counts
from .factory import SyntheticSet, synthesize
from .modules import GenerativeModule, module_kinds
from .modules.fileformat import check_client_id
from .audit_report import write_site_report
from .privacy.audit import ADVICE, audit, holdout_split, verdict
from .tensors import resolve_device, use_bf16
from .runtime import classifier_kw


def federation_classes(cfg: Config) -> list[str]:
    classes = cfg.data.classes
    if not classes:
        raise FedFactoryError("a site's own data needs the federation's class list: set data.classes = "
                              '["name of class 0", "name of class 1", ...] in the config')
    return list(classes)


def load_site_data(cfg: Config, source: str) -> tuple[np.ndarray, np.ndarray]:
    """A site's images (folder per class, CSV of path,label, or .npz) as uint8 N x H x W x C and global ids."""
    d = cfg.data
    return load_labelled(source, federation_classes(cfg), split="train", size=d.size, channels=d.channels)


def new_module(cfg: Config, client_id: str) -> GenerativeModule:
    """An untrained module: the config's module keys over the preset's values."""
    m = cfg.module
    cls = module_kinds()[m.kind]
    if m.preset not in cls.presets:
        raise FedFactoryError(f"module kind {m.kind!r} has no preset {m.preset!r}; use one of {', '.join(cls.presets)}")
    preset = cls.presets[m.preset]
    unknown = [k for k in m.overrides if k not in preset["arch"] and k not in preset["train"]]
    if unknown:
        raise FedFactoryError(f"module.{unknown[0]} does not apply to module kind {m.kind!r}")
    arch = {k: v for k, v in m.overrides.items() if k in preset["arch"]}
    train = {k: v for k, v in m.overrides.items() if k in preset["train"]}
    rt = cfg.runtime
    return cls(arch, train, client_id=check_client_id(client_id), seed=cfg.seed, preset=m.preset,
               device=rt.device, bf16=rt.bf16, progress=rt.progress, compile=rt.compile, dp=cfg.privacy.dp())


def train_module(cfg: Config, client_id: str, images: np.ndarray, labels: np.ndarray,
                 on_progress=None) -> GenerativeModule:
    """The site's generative module, trained from scratch on its own images only, less the seeded share
    held out for its privacy audit (privacy.holdout), then audited against it (`on_progress`: fit's)."""
    train, held = holdout_split(labels, cfg.privacy.holdout, cfg.seed, client_id)
    module = new_module(cfg, client_id).fit(images[train], labels[train], on_progress=on_progress)
    if len(held):
        audit_module(cfg, module, images[train], labels[train], images[held], labels[held])
    return module


POLICY = ("max_copy_rate", "max_closer_to_train", "max_mia_auc", "significance")


def audit_module(cfg: Config, module: GenerativeModule, train_x, train_y, held_x, held_y) -> dict:
    """Audit a trained module; its numbers go into the manifest, its closest pairs (training images)
    into `module.audit_pairs`, which only save_audit_report ever writes out (at the site)."""
    pv = cfg.privacy
    result, module.audit_pairs = audit(module, train_x, train_y, held_x, held_y, pv.audit_samples, cfg.seed)
    policy = {k: getattr(pv, k) for k in POLICY}
    reasons = verdict(result, policy)
    module.privacy["audit"] = {**result, "passed": not reasons, "reasons": reasons, "holdout": pv.holdout,
                               "policy": policy}
    return module.privacy["audit"]


def save_audit_report(module: GenerativeModule, folder: str | Path) -> None:
    """The site's own audit report, if the module was audited here: a folder of its own, never inside
    the module's (it shows training images)."""
    if module.audit_pairs is not None:
        write_site_report(Path(folder), module.client_id, module.privacy["audit"], module.audit_pairs)


def check_upload(cfg: Config, module: GenerativeModule, kept_at: str = "") -> None:
    """A module that failed its audit does not leave the site (privacy.enforce); with enforce off it
    does, with a warning. Either way the site is told why and what to try."""
    a = module.privacy.get("audit")
    if not a or a["passed"]:
        return
    why = "; ".join(a["reasons"])
    if cfg.privacy.enforce:
        raise FedFactoryError(f"site {module.client_id}: the module failed its privacy audit and is not uploaded: "
                              f"{why}. {ADVICE}.{f' The module and its audit are kept at {kept_at}.' if kept_at else ''}")
    print(f"fedfactory: warning: site {module.client_id}: the module failed its privacy audit ({why}); "
          "uploaded anyway because privacy.enforce = false", flush=True)


def synthesize_for_site(cfg: Config, others: list[GenerativeModule], num_classes: int) -> SyntheticSet:
    """Local mode: synthetic images from the other sites' modules (classes no one else holds are left out)."""
    f = cfg.factory
    return synthesize(others, num_classes, f.per_class, cfg.seed, f.aggregation, "drop",
                      progress=cfg.runtime.progress, max_share=f.max_share)


def train_expert(cfg: Config, client_id: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
                 synth: SyntheticSet, augment: str = "natural"):
    """Local mode: a classifier on the site's own images plus synthetic images of the classes it lacks."""
    lacking = ~np.isin(synth.labels, np.unique(labels))
    x = np.concatenate([images, synth.images[lacking]])
    y = np.concatenate([labels, synth.labels[lacking]])
    return train_classifier(x, y, num_classes, cfg.classifier, cfg.seed, client_id, **classifier_kw(cfg, augment))


def load_site_test(model: FederatedClassifier, source: str) -> tuple[np.ndarray, np.ndarray]:
    """The site's own test images, read as the classifier needs them (its classes, size and channels)."""
    h, w, c = model.image_shape
    if h != w:
        raise FedFactoryError(f"the classifier takes {h} x {w} images; site folders are resized to squares")
    return load_labelled(source, model.class_names, split="test", size=h, channels=c)


def evaluate_at_site(model: FederatedClassifier, images: np.ndarray, labels: np.ndarray, client_id: str,
                     runtime: RuntimeConfig | None = None) -> dict:
    """What the site sends back about the classifier: counts on its own test images (evaluate.site_counts),
    never an image or a per-image score."""
    rt = runtime or RuntimeConfig()
    device = resolve_device(rt.device)
    log_proba = model.predict_log_proba(images, device, use_bf16(device, rt.bf16))
    return {"format": "fedfactory-site-evaluation", "client_id": check_client_id(client_id),
            "model_sha256": model.file_sha256, **site_counts(labels, log_proba, model.num_classes)}
