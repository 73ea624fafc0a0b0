"""The ClientApp: a site trains its generative module on its own data and replies with it, once.

Node config (flower-supernode --node-config): partition-id (int) picks this site's share of the
configured partition; data-root (str, optional) is where this site keeps the data set; keep-dir
(str, optional) keeps a copy of the uploaded module at the site.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ...config import load_config_text
from ...data.partition import client_id
from ...errors import FedFactoryError
from ..embedded import prepare_data, setup_runtime, train_client
from .messages import module_content, read_config

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = load_config_text(read_config(msg.content))
    node = context.node_config
    if "data-root" in node:
        cfg["data"]["root"] = str(node["data-root"])
    cfg["runtime"]["progress"] = False
    if "partition-id" not in node:
        raise FedFactoryError("this SuperNode has no partition-id in its --node-config")
    cid = client_id(int(node["partition-id"]))
    setup_runtime(cfg)
    ds, part = prepare_data(cfg)
    if cid not in part.indices:
        raise FedFactoryError(f"{cid} is not a client of this federation ({part.clients})")
    module = train_client(cfg, ds, part, cid)
    if "keep-dir" in node:
        module.save(f"{node['keep-dir']}/{cid}")
    blob, manifest = module.to_bytes()
    return Message(module_content(blob, manifest), reply_to=msg)
