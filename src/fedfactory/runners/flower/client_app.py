"""The ClientApp wraps a site: it trains the site's generative module on the site's own data and
replies with it, once. In local mode a second message brings the other sites' modules; the site
trains its expert classifier on its own images plus synthetic images of the classes it lacks.

Node config (flower-supernode --node-config):
  data (str)            this site's own images: a folder per class, a CSV of path,label, or an .npz;
                        the config's data.classes maps class names to global ids
  client-id (str)       with data: this site's client id (default: the data folder's name)
  partition-id (int)    without data: simulate a site by its share of the config's public data set
                        (num-partitions, if given, must match partition.clients; data-root overrides data.root)
  keep-dir (str)        the site keeps a copy of the module it uploaded here
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ...classify import classifier_to_bytes
from ...config import load_config_text
from ...data.partition import client_id
from ...errors import FedFactoryError
from ...modules import load_module
from ...modules.fileformat import write_module_dir
from ...modules.limits import Limits
from ...runtime import setup_runtime
from ...site import (check_upload, federation_classes, load_site_data, save_audit_report, synthesize_for_site,
                     train_expert, train_module)
from ..embedded import prepare_data, site_data
from .messages import have_content, module_content, read_config, read_have, read_modules, weights_content

app = ClientApp()


def this_site(cfg: dict, node: dict):
    """(client id, images, labels, number of classes, augmentation policy) of this SuperNode's site."""
    if "data" in node:
        data = str(node["data"])
        cid = str(node.get("client-id", Path(data).resolve().name))
        images, labels = load_site_data(cfg, data)
        return cid, images, labels, len(federation_classes(cfg)), "natural"
    if "partition-id" not in node:
        raise FedFactoryError("this SuperNode has neither data nor partition-id in its --node-config")
    if "data-root" in node:
        cfg["data"]["root"] = str(node["data-root"])
    if ("num-partitions" in node and cfg["partition"]["scheme"] != "natural"
            and int(node["num-partitions"]) != cfg["partition"]["clients"]):
        raise FedFactoryError(f"this SuperNode expects {node['num-partitions']} partitions, "
                              f"the run config has partition.clients = {cfg['partition']['clients']}")
    cid = client_id(int(node["partition-id"]))
    ds, part = prepare_data(cfg)
    if cid not in part.indices:
        raise FedFactoryError(f"{cid} is not a client of this federation ({part.clients})")
    return cid, *site_data(ds, part, cid), ds.num_classes, ds.augment


@app.train()
def train(msg: Message, context: Context) -> Message:
    text, phase = read_config(msg.content)
    cfg = load_config_text(text)
    cfg["runtime"]["progress"] = False
    node = context.node_config
    setup_runtime(cfg)
    cid, images, labels, num_classes, augment = this_site(cfg, node)

    if phase == "module":
        if cid in read_have(msg.content):  # a resumed run: the server verified this site's module already
            return Message(have_content(cid), reply_to=msg)
        module = train_module(cfg, cid, images, labels)
        kept = ""
        if "keep-dir" in node:  # the module, and beside it the site's own audit report
            keep = Path(str(node["keep-dir"]))
            module.save(keep / cid)
            save_audit_report(module, keep / f"{cid}-audit")
            kept = f"{keep / cid} and {keep / f'{cid}-audit'}"
        check_upload(cfg, module, kept_at=kept)  # a module that failed its audit never leaves the site
        return Message(module_content(*module.to_bytes()), reply_to=msg)

    # phase "expert": the other sites' modules, checked like any module file against the federation's
    # caps and this site's image shape, then the local expert. Their folders are named by position:
    # a name from a peer is never a path.
    limits = Limits.from_config(cfg["federation"], images.shape[1:], num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        others = []
        for i, (blob, manifest) in enumerate(read_modules(msg.content)):
            write_module_dir(Path(tmp) / f"module-{i}", blob, manifest)
            others.append(load_module(Path(tmp) / f"module-{i}", cfg["runtime"]["device"], cfg["runtime"]["bf16"],
                                      limits=limits))
    synth = synthesize_for_site(cfg, others, num_classes)
    net, _ = train_expert(cfg, cid, images, labels, num_classes, synth, augment)
    return Message(weights_content(classifier_to_bytes(net, cid)), reply_to=msg)
