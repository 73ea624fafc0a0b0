"""What crosses the network: the run config out, a module (safetensors bytes + manifest) back."""

from __future__ import annotations

import hashlib
import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from ...errors import FedFactoryError


# The two phases of a site's work. "module": fit the generative module and reply with it (the one
# round). "expert" (local mode only): receive the other sites' modules, train the local classifier.
PHASES = ("module", "expert")


def config_content(config_toml: str, phase: str, modules: list[tuple[bytes, dict]] = ()) -> RecordDict:
    content = RecordDict({"fedfactory": ConfigRecord({"config-toml": config_toml, "phase": phase})})
    for i, (blob, manifest) in enumerate(modules):
        content[f"module-{i}"] = _blob_record(blob)
        content[f"manifest-{i}"] = ConfigRecord({"json": json.dumps(manifest)})
    return content


def read_config(content: RecordDict) -> tuple[str, str]:
    rec = content["fedfactory"]
    return str(rec["config-toml"]), str(rec["phase"])


def _blob_record(blob: bytes) -> ArrayRecord:
    return ArrayRecord(array_dict={"bytes": Array(ndarray=np.frombuffer(blob, np.uint8))})


def _blob(record) -> bytes:
    return record["bytes"].numpy().tobytes()


def module_content(blob: bytes, manifest: dict) -> RecordDict:
    return RecordDict({"module": _blob_record(blob), "manifest": ConfigRecord({"json": json.dumps(manifest)})})


def weights_content(blob: bytes) -> RecordDict:
    return RecordDict({"weights": _blob_record(blob)})


def read_weights_blob(content: RecordDict) -> bytes:
    try:
        return _blob(content["weights"])
    except (KeyError, TypeError, ValueError) as e:
        raise FedFactoryError(f"malformed classifier reply: {e}") from None


def read_modules(content: RecordDict) -> list[tuple[bytes, dict]]:
    out, i = [], 0
    while f"module-{i}" in content:
        out.append(_checked(_blob(content[f"module-{i}"]), json.loads(str(content[f"manifest-{i}"]["json"]))))
        i += 1
    return out


def read_module(content: RecordDict) -> tuple[bytes, dict]:
    """Bytes and manifest of a reply; refuses one whose bytes do not hash to its manifest."""
    try:
        return _checked(_blob(content["module"]), json.loads(str(content["manifest"]["json"])))
    except (KeyError, TypeError, ValueError) as e:
        raise FedFactoryError(f"malformed module reply: {e}") from None


def _checked(blob: bytes, manifest: dict) -> tuple[bytes, dict]:
    digest = hashlib.sha256(blob).hexdigest()
    if digest != manifest.get("weights_sha256"):
        raise FedFactoryError(f"module bytes hash to {digest[:16]}..., its manifest says "
                              f"{str(manifest.get('weights_sha256'))[:16]}...")
    return blob, manifest
