"""The ClientApp wraps a site: it trains the site's generative module on the site's own data and
replies with it, once. In local mode a second message brings the other sites' modules; the site
trains its expert classifier on its own images plus synthetic images of the classes it lacks.

Node config (flower-supernode --node-config):
  data (str)            this site's own images: a folder per class, a CSV of path,label, or an .npz;
                        the config's data.classes maps class names to global ids
  client-id (str)       with data: this site's client id (default: the data folder's name)
  partition-id (int)    without data: simulate a site by its share of the config's public data set
                        (num-partitions, if given, must match partition.clients; data-root overrides data.root)
  test (str)            this site's own test images: it evaluates the federation's classifier on them
                        and replies with counts only (evaluate.site_counts)
  policy (str)          this site's policy file (site-policy.toml): a request that breaks it is refused
                        here, and nothing leaves the site (policy.py)
  keep-dir (str)        the site keeps here what it sent and received: its module and audit report, the
                        final classifier, its evaluation, the report, and its log (the policy's keep_dir wins)
  sign-key (str)        this site's private key (OpenSSH, ECDSA P-384: its SuperNode key will do): the module's
                        manifest is signed with it, for a roster that lists the public key (signing.py)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ...classify import classifier_to_bytes
from ...classify.model import FederatedClassifier
from ...config import Config, load_config_text
from ...data.partition import client_id
from ...errors import FedFactoryError
from ...modules import load_module
from ...modules.fileformat import check_client_id, write_module_dir
from ...modules.limits import Limits
from ...policy import accept, load_policy, record_terms
from ...privacy.audit import holdout_split
from ...report import curve_rows, write_curves
from ...runtime import setup_runtime
from ...signing import load_private_key, signed_bytes
from ...site import (check_upload, evaluate_at_site, federation_classes, load_site_data, load_site_test,
                     save_audit_report, synthesize_for_site, train_expert, train_module)
from ...utils import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..common import prepare_data, site_data
from .messages import (answer_content, have_content, module_content, read_config, read_have, read_model_blob,
                       read_modules, read_result, weights_content)

app = ClientApp()


def site_id(node: dict) -> str:
    """This SuperNode's client id: its node config's client-id, its data folder's name, or its partition's."""
    if "data" in node:
        return check_client_id(str(node.get("client-id", Path(str(node["data"])).resolve().name)))
    if "partition-id" not in node:
        raise FedFactoryError("this SuperNode has neither data nor partition-id in its --node-config")
    return client_id(int(node["partition-id"]))


def this_site(cfg: Config, node: dict):
    """(client id, images, labels, number of classes, augmentation policy) of this SuperNode's site."""
    cid = site_id(node)
    if "data" in node:
        images, labels = load_site_data(cfg, str(node["data"]))
        return cid, images, labels, len(federation_classes(cfg)), "natural"
    if "data-root" in node:
        cfg = cfg.replace({"data.root": str(node["data-root"])})
    if ("num-partitions" in node and cfg.partition.scheme != "natural"
            and int(node["num-partitions"]) != cfg.partition.clients):
        raise FedFactoryError(f"this SuperNode expects {node['num-partitions']} partitions, "
                              f"the run config has partition.clients = {cfg.partition.clients}")
    ds, part = prepare_data(cfg)
    if cid not in part.indices:
        raise FedFactoryError(f"{cid} is not a client of this federation ({part.clients})")
    return cid, *site_data(ds, part, cid), ds.num_classes, ds.augment


@app.train()
def train(msg: Message, context: Context) -> Message:
    text, phase = read_config(msg.content)
    request = load_config_text(text, ["runtime.progress=false"])
    node = context.node_config
    policy = load_policy(str(node["policy"])) if "policy" in node else None
    keep_dir = (policy.keep_dir if policy else "") or str(node.get("keep-dir", ""))
    keep = Path(keep_dir) if keep_dir else None
    if phase in ("evaluate", "result"):  # the classifier and the report come home: no training data needed
        cid = site_id(node)
        cfg = accept(policy, request, cid, phase, keep or "")
        setup_runtime(cfg)
        content = evaluate(msg, cfg, node, cid, keep) if phase == "evaluate" else keep_result(msg, cid, keep)
        return Message(content, reply_to=msg)

    cid, images, labels, num_classes, augment = this_site(request, node)
    if phase == "module" and cid in read_have(msg.content):  # a resumed run: the server verified it already
        return Message(have_content(cid), reply_to=msg)
    n_train = len(holdout_split(labels, request.privacy.holdout, request.seed, cid)[0])
    cfg = accept(policy, request, cid, phase, keep or "", n_train)  # refused here: nothing leaves the site
    setup_runtime(cfg)

    if phase == "module":
        sign_key = str(node.get("sign-key", ""))
        if sign_key:
            load_private_key(sign_key)  # a bad key fails now, not after training
        module = train_module(cfg, cid, images, labels)
        record_terms(module, policy, cfg)
        blob, manifest = signed_bytes(module, sign_key)  # the final manifest, signed once: kept and sent alike
        kept = ""
        if keep:  # the module, and beside it the site's own audit report and training loss
            module.saved_manifest = write_module_dir(keep / cid, blob, manifest)
            save_audit_report(module, keep / f"{cid}-audit")
            write_curves(keep / f"{cid}-curves.csv", curve_rows(f"module/{cid}", module.curve))
            kept = f"{keep / cid} and {keep / f'{cid}-audit'}"
        check_upload(cfg, module, kept_at=kept)  # a module that failed its audit never leaves the site
        return Message(module_content(blob, manifest), reply_to=msg)

    # phase "expert": the other sites' modules, checked like any module file against the federation's
    # caps and this site's image shape, then the local expert. Their folders are named by position:
    # a name from a peer is never a path.
    limits = Limits.from_config(cfg.federation, images.shape[1:], num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        others = []
        for i, (blob, manifest) in enumerate(read_modules(msg.content)):
            write_module_dir(Path(tmp) / f"module-{i}", blob, manifest)
            others.append(load_module(Path(tmp) / f"module-{i}", cfg.runtime.device, cfg.runtime.bf16,
                                      limits=limits))
    synth = synthesize_for_site(cfg, others, num_classes)
    net, _ = train_expert(cfg, cid, images, labels, num_classes, synth, augment)
    return Message(weights_content(classifier_to_bytes(net, cid)), reply_to=msg)


def evaluate(msg: Message, cfg: Config, node: dict, cid: str, keep: Path | None):
    """The federation's classifier comes home: the site keeps it and, with test images of its own,
    replies with counts on them (no image, no per-image score)."""
    blob = read_model_blob(msg.content)
    model = FederatedClassifier.from_bytes(blob, "the coordinator's classifier")
    answer = None
    if "test" in node:
        answer = evaluate_at_site(model, *load_site_test(model, str(node["test"])), cid, cfg.runtime)
    if keep:
        atomic_write_bytes(keep / f"{cid}-result" / "model.safetensors", blob)
        if answer:
            atomic_write_json(keep / f"{cid}-result" / "evaluation.json", answer)
    return answer_content(answer)


def keep_result(msg: Message, cid: str, keep: Path | None):
    """The run's report and metrics come home, beside the classifier."""
    report, metrics = read_result(msg.content)
    if keep:
        atomic_write_text(keep / f"{cid}-result" / "report.md", report)
        atomic_write_text(keep / f"{cid}-result" / "metrics.json", metrics)
    return answer_content(None)
