"""What crosses the network: the run config out, a module (safetensors bytes + manifest) back."""

from __future__ import annotations

import hashlib
import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from ...errors import FedFactoryError


def config_content(config_toml: str) -> RecordDict:
    return RecordDict({"fedfactory": ConfigRecord({"config-toml": config_toml})})


def read_config(content: RecordDict) -> str:
    return str(content["fedfactory"]["config-toml"])


def module_content(blob: bytes, manifest: dict) -> RecordDict:
    return RecordDict({
        "module": ArrayRecord(array_dict={"weights": Array(ndarray=np.frombuffer(blob, np.uint8))}),
        "manifest": ConfigRecord({"json": json.dumps(manifest)}),
    })


def read_module(content: RecordDict) -> tuple[bytes, dict]:
    """Bytes and manifest of a reply; refuses one whose bytes do not hash to its manifest."""
    try:
        blob = content["module"]["weights"].numpy().tobytes()
        manifest = json.loads(str(content["manifest"]["json"]))
    except (KeyError, TypeError, ValueError) as e:
        raise FedFactoryError(f"malformed module reply: {e}") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != manifest.get("weights_sha256"):
        raise FedFactoryError(f"module bytes hash to {digest[:16]}..., its manifest says "
                              f"{str(manifest.get('weights_sha256'))[:16]}...")
    return blob, manifest
