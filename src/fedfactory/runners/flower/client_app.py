"""The ClientApp: a site trains its generative module on its own data and replies with it, once.
In local mode a second message brings the other sites' modules; the site trains its expert
classifier on its own images plus synthetic images of the classes it lacks, and replies with it.

Node config (flower-supernode --node-config): partition-id (int) picks this site's share of the
configured partition (num-partitions, if given, must match partition.clients); data-root (str, optional) is where this site keeps the data set; keep-dir
(str, optional) keeps a copy of the uploaded module at the site.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from safetensors.torch import save as save_safetensors

from ...config import load_config_text
from ...data.partition import client_id
from ...errors import FedFactoryError
from ...factory import synthesize
from ...modules import load_module
from ...modules.fileformat import write_module_dir
from ..embedded import prepare_data, setup_runtime, train_client, train_local_expert
from .messages import module_content, read_config, read_modules, weights_content

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    text, phase = read_config(msg.content)
    cfg = load_config_text(text)
    node = context.node_config
    if "data-root" in node:
        cfg["data"]["root"] = str(node["data-root"])
    cfg["runtime"]["progress"] = False
    if "partition-id" not in node:
        raise FedFactoryError("this SuperNode has no partition-id in its --node-config")
    cid = client_id(int(node["partition-id"]))
    if ("num-partitions" in node and cfg["partition"]["scheme"] != "natural"
            and int(node["num-partitions"]) != cfg["partition"]["clients"]):
        raise FedFactoryError(f"this SuperNode expects {node['num-partitions']} partitions, "
                              f"the run config has partition.clients = {cfg['partition']['clients']}")
    setup_runtime(cfg)
    ds, part = prepare_data(cfg)
    if cid not in part.indices:
        raise FedFactoryError(f"{cid} is not a client of this federation ({part.clients})")

    if phase == "module":
        module = train_client(cfg, ds, part, cid)
        if "keep-dir" in node:
            module.save(Path(str(node["keep-dir"])) / cid)
        return Message(module_content(*module.to_bytes()), reply_to=msg)

    # phase "expert": the other sites' modules, verified like any module file, then the local expert
    with tempfile.TemporaryDirectory() as tmp:
        others = []
        for blob, manifest in read_modules(msg.content):
            path = Path(tmp) / str(manifest["client_id"])
            write_module_dir(path, blob, manifest)
            others.append(load_module(path, cfg["runtime"]["device"], cfg["runtime"]["bf16"]))
    f = cfg["factory"]
    synth = synthesize(others, ds.num_classes, f["per_class"], cfg["seed"], f["aggregation"], "drop", progress=False)
    net, _ = train_local_expert(cfg, ds, part, cid, synth)
    return Message(weights_content(save_safetensors(net.state_dict())), reply_to=msg)
