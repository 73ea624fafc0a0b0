"""The one round without a live network: modules travel as folders (a secure file transfer, a disk
carried between sites).

    at each site:      fedfactory site train --config C --data DIR --out MODULE_DIR
    (local mode)       fedfactory site expert --config C --data DIR --modules OTHER_DIRS --out EXPERT
    at the server:     fedfactory server build --config C --modules DIRS --test DATA --out RUN_DIR [--experts ...]

The same site and server code as `fedfactory run` and the Flower apps: the same data, config and
seed give the same bits.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..classify import classifier_from_bytes, classifier_to_bytes
from ..errors import FedFactoryError
from ..modules import GenerativeModule, load_module
from ..modules.fileformat import check_client_id
from ..modules.limits import Limits
from ..runtime import setup_runtime
from ..server import (build, check_modules, check_new_run_dir, load_test_set, module_limits, receive_module,
                      start_run)
from ..privacy.audit import holdout_split
from ..site import (audit_module, check_upload, federation_classes, load_site_data, save_audit_report,
                    synthesize_for_site, train_expert, train_module)
from ..utils import atomic_write_bytes


def site_train(cfg: dict, data: str, out: str | Path, client_id: str = "", audit_out: str | Path = "") -> GenerativeModule:
    """A site makes its module alone, from its own data only; the client id defaults to the folder name of `out`.
    Its audit report (which shows training images) goes to `audit_out`, by default `<out>-audit` beside it."""
    out = Path(out)
    cid = check_client_id(client_id or out.resolve().name)
    report = Path(audit_out or out.parent / f"{out.name}-audit")
    for folder in (out, report):
        if folder.exists() and any(folder.iterdir()):
            raise FedFactoryError(f"{folder} already holds files: choose another --out (or --audit-out)")
    setup_runtime(cfg)
    module = train_module(cfg, cid, *load_site_data(cfg, data))
    module.save(out)
    save_audit_report(module, report)
    check_upload(cfg, module, kept_at=f"{out} and {report}")
    return module


def site_audit(cfg: dict, module_dir: str | Path, data: str, out: str | Path = "") -> dict:
    """Audit any module against the site's data, split as training split it (the config's privacy.holdout
    and the module's seed and client id). Writes the site's report to `out`; the module is not changed."""
    module_dir = Path(module_dir)
    setup_runtime(cfg)
    module = load_module(module_dir, cfg["runtime"]["device"], cfg["runtime"]["bf16"])
    images, labels = load_site_data(cfg, data)
    pv = cfg["privacy"]
    if pv["holdout"] <= 0:
        raise FedFactoryError("privacy.holdout is 0: an audit needs the site's held-out images")
    train, held = holdout_split(labels, pv["holdout"], module.seed, module.client_id)
    counts = [int(np.sum(labels[train] == c)) for c in module.classes]
    if counts != module.counts:
        raise FedFactoryError(f"{module_dir} was trained on {module.counts} images of classes {module.classes}; "
                              f"{data} with privacy.holdout = {pv['holdout']} leaves {counts} for training: the "
                              "held-out images may have been trained on (same data, holdout and seed as at training?)")
    result = audit_module(cfg, module, images[train], labels[train], images[held], labels[held])
    save_audit_report(module, out or module_dir.parent / f"{module_dir.name}-audit")
    return result


def site_expert(cfg: dict, data: str, module_dirs: list[str], out: str | Path, client_id: str):
    """Local mode: a site's expert classifier from its own data and the other sites' module folders."""
    cid = check_client_id(client_id)
    setup_runtime(cfg)
    images, labels = load_site_data(cfg, data)
    num_classes = len(federation_classes(cfg))
    limits = Limits.from_config(cfg["federation"], images.shape[1:], num_classes)  # as the server checks them
    others = [load_module(d, cfg["runtime"]["device"], cfg["runtime"]["bf16"], limits=limits) for d in module_dirs]
    synth = synthesize_for_site(cfg, others, num_classes)
    net, stats = train_expert(cfg, cid, images, labels, num_classes, synth)
    atomic_write_bytes(out, classifier_to_bytes(net, cid))
    return net, stats


def server_build(cfg: dict, module_dirs: list[str], test: str, out: str | Path, expert_files: list[str] = ()) -> dict:
    """The server's whole job from module folders gathered in any way: verify, register, factory, classifier.
    Everything is read and checked before the run folder is created, so a bad input leaves nothing behind."""
    out = Path(out)
    check_new_run_dir(out)
    setup_runtime(cfg)
    t = time.perf_counter()
    test = str(Path(test).resolve()) if test and Path(test).exists() else test
    test_set = load_test_set(cfg, test)
    timings = {"data": time.perf_counter() - t}
    limits = module_limits(cfg, test_set)
    incoming = [load_module(d, cfg["runtime"]["device"], limits=limits) for d in module_dirs]
    ids = [m.client_id for m in incoming]
    if len(set(ids)) != len(ids):
        raise FedFactoryError(f"two module folders claim the same client id: {sorted(ids)}")
    check_modules(cfg, incoming, test_set)
    experts = {}
    for f in expert_files:
        try:
            blob = Path(f).read_bytes()
        except OSError as e:
            raise FedFactoryError(f"cannot read expert {f}: {e.strerror or e}") from None
        net, name = classifier_from_bytes(blob, test_set.image_shape[-1], test_set.num_classes, cfg["classifier"])
        if name not in ids:
            raise FedFactoryError(f"expert {f} names client {name!r}, which sent no module")
        experts[name] = (net, {"trained_at": "site", "file": str(f)})
    start_run(cfg, out)
    modules = [receive_module(out, Path(d), limits, cfg["runtime"]["device"]) for d in module_dirs]
    return build(cfg, modules, test_set, out, timings, experts=experts, test_source=test)
