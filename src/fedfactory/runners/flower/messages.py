"""What crosses the network: the run config out, a module (safetensors bytes + manifest) back."""

from __future__ import annotations

import hashlib
import json
from io import BytesIO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.constant import SType

from ...data.npz import MAX_HEADER, read_npy_header
from ...errors import FedFactoryError

# What a message may carry, checked before anything is copied or parsed: a module's (or a
# classifier's) bytes, its manifest's JSON text, and the run config's TOML text.
MAX_MESSAGE_BYTES = 1 << 30
MAX_MANIFEST_CHARS = 1 << 20
MAX_CONFIG_CHARS = 1 << 20


# The phases of a site's work. "module": fit the generative module and reply with it (the one
# round). "expert" (local mode only): receive the other sites' modules, train the local classifier.
# "evaluate": receive the federation's classifier, keep it, and reply with counts on the site's own
# test images. "result": receive the run's report and metrics, keep them.
PHASES = ("module", "expert", "evaluate", "result")
MAX_ANSWER_CHARS = 64 << 20


def config_content(config_toml: str, phase: str, modules: list[tuple[bytes, dict]] = (),
                   have: list[str] = ()) -> RecordDict:
    """The server's message. `have`: client ids whose modules the server already holds (a resumed run):
    those sites answer with have_content instead of training again."""
    content = RecordDict({"fedfactory": ConfigRecord({"config-toml": config_toml, "phase": phase,
                                                      "have": json.dumps(sorted(have))})})
    for i, (blob, manifest) in enumerate(modules):
        content[f"module-{i}"] = _blob_record(blob)
        content[f"manifest-{i}"] = ConfigRecord({"json": json.dumps(manifest)})
    return content


def read_config(content: RecordDict) -> tuple[str, str]:
    """The run config (TOML text) and the phase of a server's message; a malformed one is refused."""
    rec = _record(content, "fedfactory", ConfigRecord, "config")
    text, phase = rec.get("config-toml"), rec.get("phase")
    if not isinstance(text, str) or len(text) > MAX_CONFIG_CHARS:
        raise FedFactoryError(f"malformed config message: config-toml must be text of at most {MAX_CONFIG_CHARS:,} "
                              f"characters, got {type(text).__name__}")
    if phase not in PHASES:
        raise FedFactoryError(f"malformed config message: phase must be one of {PHASES}, got {str(phase)[:40]!r}")
    return text, phase


def read_have(content: RecordDict) -> set[str]:
    """The client ids the server already holds (see config_content); malformed means none."""
    try:
        have = json.loads(str(content["fedfactory"].get("have", "[]")))
    except (KeyError, TypeError, ValueError, RecursionError):
        return set()
    return {c for c in have if isinstance(c, str)} if isinstance(have, list) else set()


def have_content(client_id: str) -> RecordDict:
    """A site's answer when the server already holds its module: no training, no bytes."""
    return RecordDict({"have": ConfigRecord({"client-id": client_id})})


def read_have_reply(content: RecordDict) -> str | None:
    """The client id of a have_content reply, or None when the reply is something else."""
    rec = content.get("have") if isinstance(content, RecordDict) else None
    return str(rec.get("client-id", "")) if isinstance(rec, ConfigRecord) else None


def _blob_record(blob: bytes) -> ArrayRecord:
    return ArrayRecord(array_dict={"bytes": Array(ndarray=np.frombuffer(blob, np.uint8))})


def _blob(record) -> bytes:
    """The bytes of a blob record: one 1-D uint8 numpy Array, checked (its size against MAX_MESSAGE_BYTES
    first) before anything is copied. The .npy header is parsed without eval, never by np.load."""
    if not isinstance(record, ArrayRecord):
        raise FedFactoryError(f"expected an array record, got {type(record).__name__}")
    arr = record.get("bytes")
    if not isinstance(arr, Array):
        raise FedFactoryError("the array record holds no 'bytes' array")
    shape, data = arr.shape, arr.data
    if arr.stype != SType.NUMPY or arr.dtype != "uint8" or not isinstance(shape, (tuple, list)) or len(shape) != 1 \
            or type(shape[0]) is not int or not isinstance(data, bytes):
        raise FedFactoryError(f"the 'bytes' array must be 1-D uint8 numpy data, got dtype {arr.dtype!r:.20} "
                              f"shape {shape!r:.40} stype {arr.stype!r:.20}")
    n = shape[0]
    if not 0 <= n <= MAX_MESSAGE_BYTES or len(data) > MAX_MESSAGE_BYTES + MAX_HEADER + 12:
        raise FedFactoryError(f"the 'bytes' array declares {n:,} bytes and holds {len(data):,}: "
                              f"the cap is {MAX_MESSAGE_BYTES:,}")
    npy_shape, _, dtype, offset = read_npy_header(BytesIO(data), "the 'bytes' array")
    if dtype != np.uint8 or npy_shape != (n,) or len(data) - offset != n:
        raise FedFactoryError(f"the 'bytes' array declares {n:,} uint8 bytes, its data holds {npy_shape} {dtype} "
                              f"in {len(data) - offset:,} bytes")
    return data[offset:]


def module_content(blob: bytes, manifest: dict) -> RecordDict:
    return RecordDict({"module": _blob_record(blob), "manifest": ConfigRecord({"json": json.dumps(manifest)})})


def weights_content(blob: bytes) -> RecordDict:
    return RecordDict({"weights": _blob_record(blob)})


def read_weights_blob(content: RecordDict) -> bytes:
    try:
        return _blob(_record(content, "weights", ArrayRecord, "classifier"))
    except FedFactoryError as e:
        raise FedFactoryError(f"malformed classifier reply: {e}") from None


def read_modules(content: RecordDict) -> list[tuple[bytes, dict]]:
    """The modules a server sends with an expert-phase message: module-0, manifest-0, module-1, ..."""
    out, i = [], 0
    while f"module-{i}" in content:
        try:
            out.append(_checked(_blob(content[f"module-{i}"]), _manifest(_record(content, f"manifest-{i}", ConfigRecord))))
        except FedFactoryError as e:
            raise FedFactoryError(f"malformed module {i} in the server's message: {e}") from None
        i += 1
    return out


def read_module(content: RecordDict) -> tuple[bytes, dict]:
    """Bytes and manifest of a reply; refuses one whose bytes do not hash to its manifest."""
    try:
        return _checked(_blob(_record(content, "module", ArrayRecord)), _manifest(_record(content, "manifest", ConfigRecord)))
    except FedFactoryError as e:
        raise FedFactoryError(f"malformed module reply: {e}") from None


def _record(content, key: str, kind: type, what: str = ""):
    """content[key], which must be a record of type `kind`."""
    if not isinstance(content, RecordDict):
        raise FedFactoryError(f"expected a RecordDict, got {type(content).__name__}")
    if key not in content:
        raise FedFactoryError(f"{what + ' message' if what else 'message'} has no {key!r} record")
    rec = content[key]
    if not isinstance(rec, kind):
        raise FedFactoryError(f"{key!r} must be a {kind.__name__}, got {type(rec).__name__}")
    return rec


def _manifest(rec: ConfigRecord) -> dict:
    """The manifest's JSON text -> a dict (a bounded text, parsed without recursion errors escaping)."""
    text = rec.get("json")
    if not isinstance(text, str) or len(text) > MAX_MANIFEST_CHARS:
        raise FedFactoryError(f"the manifest must be JSON text of at most {MAX_MANIFEST_CHARS:,} characters, "
                              f"got {type(text).__name__}" + (f" of {len(text):,}" if isinstance(text, str) else ""))
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; deep nesting overflows the parser
        raise FedFactoryError(f"the manifest is not valid JSON: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(manifest, dict):
        raise FedFactoryError(f"the manifest must be a JSON object, got {type(manifest).__name__}")
    return manifest


def _checked(blob: bytes, manifest: dict) -> tuple[bytes, dict]:
    digest = hashlib.sha256(blob).hexdigest()
    if not isinstance(manifest, dict) or digest != manifest.get("weights_sha256"):
        claim = manifest.get("weights_sha256") if isinstance(manifest, dict) else None
        raise FedFactoryError(f"module bytes hash to {digest[:16]}..., its manifest says {str(claim)[:16]!r}...")
    return blob, manifest


def evaluate_content(config_toml: str, model_blob: bytes) -> RecordDict:
    content = config_content(config_toml, "evaluate")
    content["model"] = _blob_record(model_blob)
    return content


def read_model_blob(content: RecordDict) -> bytes:
    try:
        return _blob(_record(content, "model", ArrayRecord, "evaluate"))
    except FedFactoryError as e:
        raise FedFactoryError(f"malformed classifier message: {e}") from None


def answer_content(answer: dict | None) -> RecordDict:
    """A site's evaluation (counts only), or null for a site with no test images."""
    return RecordDict({"evaluation": ConfigRecord({"json": json.dumps(answer)})})


def read_answer(content: RecordDict) -> dict | None:
    text = _record(content, "evaluation", ConfigRecord, "evaluation").get("json")
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        raise FedFactoryError(f"malformed evaluation: JSON text of at most {MAX_ANSWER_CHARS:,} characters expected")
    try:
        answer = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise FedFactoryError(f"malformed evaluation: {type(e).__name__}") from None
    if answer is not None and not isinstance(answer, dict):
        raise FedFactoryError("malformed evaluation: a JSON object or null expected")
    return answer


def result_content(config_toml: str, report: str, metrics: dict) -> RecordDict:
    content = config_content(config_toml, "result")
    content["result"] = ConfigRecord({"report": report, "metrics": json.dumps(metrics)})
    return content


def read_result(content: RecordDict) -> tuple[str, str]:
    """The report (Markdown) and the metrics (JSON text) the coordinator sends home."""
    rec = _record(content, "result", ConfigRecord, "result")
    report, metrics = rec.get("report"), rec.get("metrics")
    if not (isinstance(report, str) and isinstance(metrics, str) and len(report) + len(metrics) <= MAX_ANSWER_CHARS):
        raise FedFactoryError("malformed result message: a report and metrics as text expected")
    return report, metrics
