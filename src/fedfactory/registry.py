"""A run's module registry (registry.json) and its append-only audit log (audit.jsonl).

The log is hash-chained: each line carries `prev`, the SHA-256 of the line before it (its exact bytes,
newline included; 64 zeros for the first), so `verify_audit` finds an edited, removed or reordered
line. Anyone who can write the file can rewrite the chain from the edited line on, and removing the
last lines leaves a shorter chain that still holds: compare the head that `fedfactory verify` prints
with one kept elsewhere to see those.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import FedFactoryError
from .utils import atomic_write_json, sha256_file

REGISTRY, AUDIT = "registry.json", "audit.jsonl"
GENESIS = "0" * 64  # the `prev` of a log's first line


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _last_line(f) -> bytes:
    """The last line of an open binary file, its newline included (b"" for an empty file)."""
    pos, tail = f.seek(0, 2), b""
    while pos > 0 and b"\n" not in tail[:-1]:
        step = min(4096, pos)
        pos -= step
        f.seek(pos)
        tail = f.read(step) + tail
    return tail[tail.rfind(b"\n", 0, len(tail) - 1) + 1:]


def append_audit(run_dir: Path, event: str, **fields) -> None:
    """One JSON line per event, appended and flushed: additions and removals are never rewritten.
    Each line carries the SHA-256 of the line before it (`prev`)."""
    with open(Path(run_dir) / AUDIT, "a+b") as f:
        last = _last_line(f)
        prev = hashlib.sha256(last).hexdigest() if last else GENESIS
        f.write((json.dumps({"time": _now(), "user": _user(), "event": event, **fields, "prev": prev}) + "\n").encode())
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


def verify_audit(run_dir: Path) -> tuple[list[str], str]:
    """The audit log's chain: (problems, a one-line summary). A log written before chaining (no line has
    `prev`) is not chained: no problem, and the summary says so."""
    path = Path(run_dir) / AUDIT
    if not path.exists():
        return [f"{path} is missing"], "audit log missing"
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines[-1]:
        return [f"{path}: the last line is incomplete (no newline): the log was cut or edited"], "audit log broken"
    lines.pop()
    expected, chained, legacy = GENESIS, 0, 0
    for i, raw in enumerate(lines, 1):
        try:
            prev = json.loads(raw).get("prev")
        except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
            return [f"{path}: line {i} is not a JSON object: the log was edited"], "audit log broken"
        if prev is None and not chained:
            legacy += 1  # written before the log was chained
        elif prev != expected:
            why = ("has no prev, after chained lines" if prev is None else
                   f"does not follow line {i - 1}" if i > 1 else "is not the first line written")
            return [f"{path}: line {i} {why}: a line at or before it was edited, removed or moved"], \
                "audit log broken"
        else:
            chained += 1
        expected = hashlib.sha256(raw + b"\n").hexdigest()
    if not chained:
        return [], f"audit log: {legacy} line{'s' * (legacy != 1)}, not chained (written before fedfactory chained its log)"
    before = f", after {legacy} older unchained" if legacy else ""
    return [], f"audit log: {chained} chained line{'s' * (chained != 1)}{before}; head (SHA-256 of the last) {expected}"


def verify_signatures(run_dir: Path) -> tuple[list[str], str]:
    """Each registered module's signature against the key the run's roster (its config's federation.roster)
    lists for its site: (problems, a one-line summary)."""
    from .roster import check_signature, load_keys
    from .modules.fileformat import ModuleFileError, read_manifest

    try:
        text = (Path(run_dir) / "config.toml").read_text()
        roster = str(tomllib.loads(text).get("federation", {}).get("roster", ""))
    except (OSError, UnicodeDecodeError, AttributeError, tomllib.TOMLDecodeError) as e:
        return [f"cannot read the run's config.toml: {e}"], "signatures: not checked"
    if not roster:
        return [], "signatures: not checked (the run names no roster, federation.roster)"
    try:
        keys = load_keys(roster)
    except FedFactoryError as e:
        return [], f"signatures: not checked ({e})"
    problems, checked = [], 0
    for cid, entry in read_registry(run_dir)["modules"].items():
        if not keys.get(cid):
            continue
        checked += 1
        try:
            check_signature(cid, keys[cid], read_manifest(Path(run_dir) / entry["path"]))
        except (ModuleFileError, FedFactoryError) as e:
            problems.append(f"{cid}: {e}")
    if not checked:
        return [], f"signatures: not checked (roster {roster} lists no key for this run's sites)"
    return problems, f"signatures: {checked - len(problems)} of {checked} verified against roster {roster}'s keys"
