"""A run's module registry (registry.json) and its append-only audit log (audit.jsonl)."""

from __future__ import annotations

import datetime as dt
import getpass
import json
from pathlib import Path

from .errors import FedFactoryError
from .utils import atomic_write_json, sha256_file

REGISTRY, AUDIT = "registry.json", "audit.jsonl"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def append_audit(run_dir: Path, event: str, **fields) -> None:
    """One JSON line per event, appended and flushed: additions and removals are never rewritten."""
    with open(Path(run_dir) / AUDIT, "a") as f:
        f.write(json.dumps({"time": _now(), "user": _user(), "event": event, **fields}) + "\n")
        f.flush()


def read_registry(run_dir: Path) -> dict:
    path = Path(run_dir) / REGISTRY
    if not path.exists():
        raise FedFactoryError(f"{path} not found: is {run_dir} a fedfactory run folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FedFactoryError(f"{path} is not valid JSON: {e}") from None


def register(run_dir: Path, manifest: dict, source: str = "trained") -> dict:
    """Add (or replace) a module's entry and log it."""
    run_dir = Path(run_dir)
    path = run_dir / REGISTRY
    reg = json.loads(path.read_text()) if path.exists() else {"modules": {}}
    cid = manifest["client_id"]
    entry = {"client": cid, "kind": manifest["kind"], "classes": manifest["classes"], "counts": manifest["counts"],
             "sha256": manifest["weights_sha256"], "path": f"modules/{cid}", "received": _now(), "source": source}
    reg["modules"][cid] = entry
    atomic_write_json(path, reg)
    append_audit(run_dir, "add", client=cid, sha256=entry["sha256"], classes=entry["classes"], source=source)
    return entry


def verify(run_dir: Path) -> list[str]:
    """Re-hash every registered module; returns one line per problem (empty = all verified)."""
    run_dir = Path(run_dir)
    problems = []
    for cid, entry in read_registry(run_dir)["modules"].items():
        w = run_dir / entry["path"] / "module.safetensors"
        if not w.exists():
            problems.append(f"{cid}: {w} is missing")
        elif (digest := sha256_file(w)) != entry["sha256"]:
            problems.append(f"{cid}: {w} hashes to {digest[:16]}..., the registry says {entry['sha256'][:16]}...")
    return problems
