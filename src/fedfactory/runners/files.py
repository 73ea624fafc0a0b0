"""The one round without a live network: modules travel as folders (a secure file transfer, a disk
carried between sites).

    at each site:      fedfactory site train --config C --data DIR --out MODULE_DIR
    (local mode)       fedfactory site expert --config C --data DIR --modules OTHER_DIRS --out EXPERT
    at the server:     fedfactory server build --config C --modules DIRS [--test DATA] --out RUN_DIR [--experts ...]
    at each site:      fedfactory site evaluate RUN_DIR/model.safetensors --test DIR --client-id ID --out ANSWER
    at the server:     fedfactory server pool RUN_DIR --evaluations ANSWERS     (the sites' counts -> metrics)

A site passes its own policy (--policy site-policy.toml) to every site command: a request that breaks
it is refused before anything is trained or written.

The same site and server code as `fedfactory run` and the Flower apps: the same data, config and
seed give the same bits.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..config import Config
from ..classify import classifier_from_bytes, classifier_to_bytes
from ..classify.model import load_classifier_file
from ..errors import FedFactoryError
from ..modules import GenerativeModule, load_module
from ..modules.fileformat import check_client_id, write_module_dir
from ..modules.limits import Limits
from ..runtime import setup_runtime
from ..policy import SitePolicy, accept, record_terms
from ..server import (NO_TEST_SET, build, check_modules, check_new_run_dir, module_limits, pool_site_evaluations,
                      receive_module, start_run, test_set_for, write_build)
from ..privacy.audit import holdout_split
from ..signing import load_private_key, signed_bytes
from ..site import (audit_module, check_upload, evaluate_at_site, federation_classes, load_site_data, load_site_test,
                    save_audit_report, synthesize_for_site, train_expert, train_module)
from ..utils import atomic_write_bytes, atomic_write_json

MAX_ANSWER_BYTES = 64 << 20  # a site's evaluation: counts only


def site_train(cfg: Config, data: str, out: str | Path, client_id: str = "", audit_out: str | Path = "",
               policy: SitePolicy | None = None, sign_key: str | Path = "") -> GenerativeModule:
    """A site makes its module alone, from its own data only; the client id defaults to the folder name of `out`.
    Its audit report (which shows training images) goes to `audit_out`, by default `<out>-audit` beside it.
    With a policy, a config that breaks it is refused before anything is trained or written. With `sign_key`
    (an OpenSSH P-384 private key) the module's final manifest is signed (signing.py)."""
    out = Path(out)
    cid = check_client_id(client_id or out.resolve().name)
    report = Path(audit_out or out.parent / f"{out.name}-audit")
    for folder in (out, report):
        if folder.exists() and any(folder.iterdir()):
            raise FedFactoryError(f"{folder} already holds files: choose another --out (or --audit-out)")
    if sign_key:
        load_private_key(sign_key)  # a bad key fails now, not after training
    images, labels = load_site_data(cfg, data)
    n_train = len(holdout_split(labels, cfg.privacy.holdout, cfg.seed, cid)[0])
    cfg = accept(policy, cfg, cid, "module", policy.keep_dir if policy else "", n_train)
    setup_runtime(cfg)
    module = train_module(cfg, cid, images, labels)
    record_terms(module, policy, cfg)
    module.saved_manifest = write_module_dir(out, *signed_bytes(module, sign_key))  # signed after audit and terms
    save_audit_report(module, report)
    check_upload(cfg, module, kept_at=f"{out} and {report}")
    return module


def site_audit(cfg: Config, module_dir: str | Path, data: str, out: str | Path = "", policy: SitePolicy | None = None) -> dict:
    """Audit any module against the site's data, split as training split it (the config's privacy.holdout
    and the module's seed and client id). Writes the site's report to `out`; the module is not changed.
    With a policy, the audit's thresholds may be stricter than the policy's, never looser."""
    module_dir = Path(module_dir)
    module = load_module(module_dir, cfg.runtime.device, cfg.runtime.bf16)
    cfg = accept(policy, cfg, module.client_id, "audit", policy.keep_dir if policy else "")
    setup_runtime(cfg)
    images, labels = load_site_data(cfg, data)
    pv = cfg.privacy
    if pv.holdout <= 0:
        raise FedFactoryError("privacy.holdout is 0: an audit needs the site's held-out images")
    train, held = holdout_split(labels, pv.holdout, module.seed, module.client_id)
    counts = [int(np.sum(labels[train] == c)) for c in module.classes]
    if counts != module.counts:
        raise FedFactoryError(f"{module_dir} was trained on {module.counts} images of classes {module.classes}; "
                              f"{data} with privacy.holdout = {pv.holdout} leaves {counts} for training: the "
                              "held-out images may have been trained on (same data, holdout and seed as at training?)")
    result = audit_module(cfg, module, images[train], labels[train], images[held], labels[held])
    save_audit_report(module, out or module_dir.parent / f"{module_dir.name}-audit")
    return result


def site_expert(cfg: Config, data: str, module_dirs: list[str], out: str | Path, client_id: str,
                policy: SitePolicy | None = None):
    """Local mode: a site's expert classifier from its own data and the other sites' module folders
    (refused when the site's policy does not let an expert leave it)."""
    cid = check_client_id(client_id)
    cfg = accept(policy, cfg, cid, "expert", policy.keep_dir if policy else "")
    setup_runtime(cfg)
    images, labels = load_site_data(cfg, data)
    num_classes = len(federation_classes(cfg))
    limits = Limits.from_config(cfg.federation, images.shape[1:], num_classes)  # as the server checks them
    others = [load_module(d, cfg.runtime.device, cfg.runtime.bf16, limits=limits) for d in module_dirs]
    synth = synthesize_for_site(cfg, others, num_classes)
    net, stats = train_expert(cfg, cid, images, labels, num_classes, synth)
    atomic_write_bytes(out, classifier_to_bytes(net, cid))
    return net, stats


def site_evaluate(model_file: str | Path, test: str, client_id: str, out: str | Path,
                  policy: SitePolicy | None = None) -> dict:
    """The site evaluates the federation's classifier on its own test images and writes its answer to
    the coordinator: counts only (a confusion matrix and score histograms), no image, no per-image score."""
    cid = check_client_id(client_id)
    if policy and not policy.allow_evaluation:
        raise FedFactoryError("site policy refuses to evaluate the classifier on this site's test images "
                              "(allow_evaluation = false)")
    model = load_classifier_file(model_file)
    answer = evaluate_at_site(model, *load_site_test(model, test), cid,
                              policy.runtime if policy and policy.runtime else None)
    atomic_write_json(out, answer)
    return answer


def server_pool(run_dir: str | Path, answer_files: list[str]) -> dict:
    """The sites' evaluations (site evaluate's files) into the run's results and report."""
    answers = {}
    for f in answer_files:
        path = Path(f)
        try:
            if path.stat().st_size > MAX_ANSWER_BYTES:
                raise FedFactoryError(f"{f}: {path.stat().st_size:,} bytes, over {MAX_ANSWER_BYTES:,} for counts")
            answer = json.loads(path.read_text())
        except OSError as e:
            raise FedFactoryError(f"cannot read evaluation {f}: {e.strerror or e}") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise FedFactoryError(f"evaluation {f} is not valid JSON: {str(e)[:200]}") from None
        cid = check_client_id(answer.get("client_id") if isinstance(answer, dict) else None)
        if cid in answers:
            raise FedFactoryError(f"two evaluations name site {cid!r}")
        answers[cid] = answer
    return pool_site_evaluations(Path(run_dir), answers)


def server_build(cfg: Config, module_dirs: list[str], test: str, out: str | Path, expert_files: list[str] = ()) -> dict:
    """The server's whole job from module folders gathered in any way: verify, register, factory, classifier.
    Everything is read and checked before the run folder is created, so a bad input leaves nothing behind.
    Without a test set (test ""), the sites evaluate the classifier (site evaluate, then server pool)."""
    out = Path(out)
    check_new_run_dir(out)
    setup_runtime(cfg)
    t = time.perf_counter()
    test = str(Path(test).resolve()) if test and Path(test).exists() else test or NO_TEST_SET
    test_set = test_set_for(cfg, test)
    timings = {"data": time.perf_counter() - t}
    limits = module_limits(cfg, test_set)
    incoming = [load_module(d, cfg.runtime.device, limits=limits) for d in module_dirs]
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
        net, name = classifier_from_bytes(blob, test_set.image_shape[-1], test_set.num_classes, cfg.classifier)
        if name not in ids:
            raise FedFactoryError(f"expert {f} names client {name!r}, which sent no module")
        experts[name] = (net, {"trained_at": "site", "file": str(f)})
    start_run(cfg, out)
    modules = [receive_module(out, Path(d), limits, cfg.runtime.device) for d in module_dirs]
    built = build(cfg, modules, test_set, out, experts=experts)
    return write_build(out, built, built.results(test, timings))
