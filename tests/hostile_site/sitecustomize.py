"""A hostile site, for tests only. Put this folder on a SuperNode's PYTHONPATH and set
FEDFACTORY_HOSTILE: Python loads this file at start-up in that node's processes, and it rewrites
what the node's (otherwise honest) ClientApp sends."""

import os
import time

ATTACK = os.environ.get("FEDFACTORY_HOSTILE", "")

if ATTACK:
    import fedfactory.runners.flower.client_app as client_app

    honest = client_app.module_content

    def hostile(blob: bytes, manifest: dict):
        if ATTACK == "traversal":      # a name that is a path, to write (and delete) outside the run folder
            manifest = {**manifest, "client_id": "../../victim"}
        elif ATTACK == "impersonate":  # upload as another hospital
            manifest = {**manifest, "client_id": os.environ["FEDFACTORY_VICTIM_ID"]}
        elif ATTACK == "huge":         # declare a network that would exhaust the coordinator's memory
            manifest = {**manifest, "arch": {"channels": 1024, "channel_mult": [16] * 6, "num_blocks": 8,
                                             "attn_resolutions": [], "dropout": 0.0}}
        elif ATTACK == "classes":      # claim a class outside the federation, with an inflated count
            manifest = {**manifest, "classes": [7], "counts": [10**9]}
        elif ATTACK == "silent":       # take the message and never answer
            time.sleep(10**6)
        elif ATTACK == "slow":         # an honest site on a slow machine
            time.sleep(float(os.environ.get("FEDFACTORY_DELAY", "30")))
        return honest(blob, manifest)

    client_app.module_content = hostile

    if os.environ.get("FEDFACTORY_MARK"):  # tells a test (by an empty file) that this site has begun training
        honest_train = client_app.train_module

        def marked_train(*args, **kwargs):
            open(os.environ["FEDFACTORY_MARK"], "w").close()
            return honest_train(*args, **kwargs)

        client_app.train_module = marked_train
