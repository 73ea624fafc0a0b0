"""The consortium's agreement, held by the coordinator: which site may declare which classes, the
most real images it may claim for each, and optionally the key its modules are signed with.

    # roster.toml (federation.roster = "roster.toml"; paths inside are relative to this file)
    [sites.hospital-a]
    classes = { "no tumour" = 1200 }     # class name (or id) -> the largest count it may claim
    public_key = "keys/hospital-a.pub"   # optional: its modules must carry its signature (signing.py)

A site with a key must sign its modules with it (`site train --sign-key`, node config `sign-key`):
an unsigned module, one signed by another key, or one changed after signing is refused. A site with
no key listed may send unsigned modules.

Under `weighted` aggregation a site's declared counts decide its share of a class's synthetic
images, so without an agreement one site's claims decide the mix (the report says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import FedFactoryError
from .modules.fileformat import check_client_id
from .signing import load_public_key, openssh_line, verify_manifest

MAX_KEY_BYTES = 1 << 14


@dataclass(frozen=True)
class SiteAgreement:
    classes: dict[int, int]   # class id -> the largest count the site may claim
    public_key: str = ""      # OpenSSH one-line public key text, "" = unsigned modules accepted


def _read_sites(path: Path) -> dict:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FedFactoryError(f"roster {path} not found (federation.roster)") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise FedFactoryError(f"roster {path} is not a readable TOML file: {e}") from None
    if set(data) != {"sites"} or not isinstance(data["sites"], dict) or not data["sites"]:
        raise FedFactoryError(f"roster {path} must hold [sites.<client id>] tables and nothing else")
    return data["sites"]


def _site_key(path: Path, where: str, entry: dict) -> str:
    """The site's public key (OpenSSH one-line, P-384), read from the file the entry names, or ""."""
    if "public_key" not in entry:
        return ""
    key_path = path.parent / str(entry["public_key"])
    try:
        if key_path.stat().st_size > MAX_KEY_BYTES:
            raise FedFactoryError(f"{where}: {key_path} is too large for a public key")
        text = key_path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise FedFactoryError(f"{where}: cannot read its public key {key_path}: {getattr(e, 'strerror', '') or e}") from None
    try:
        return openssh_line(load_public_key(text))
    except FedFactoryError as e:
        raise FedFactoryError(f"{where}: {key_path}: {e}") from None


def load_roster(path: str | Path, class_names: list[str]) -> dict[str, SiteAgreement]:
    """client id -> its agreement; every name, class, count and key checked."""
    path = Path(path)
    roster = {}
    for cid, entry in _read_sites(path).items():
        where = f"roster {path}, site {cid!r}"
        check_client_id(cid)
        if not isinstance(entry, dict) or not set(entry) <= {"classes", "public_key"} or \
                not isinstance(entry.get("classes"), dict) or not entry["classes"]:
            raise FedFactoryError(f"{where}: give classes = {{ \"class name\" = largest count, ... }} "
                                  "and optionally public_key")
        classes = {}
        for name, count in entry["classes"].items():
            c = class_names.index(name) if name in class_names else int(name) if name.isdigit() else -1
            if not 0 <= c < len(class_names):
                raise FedFactoryError(f"{where}: class {name!r} is not in the federation's list {class_names}")
            if type(count) is not int or count < 1:
                raise FedFactoryError(f"{where}: the largest count for {name!r} must be a positive integer")
            classes[c] = count
        roster[cid] = SiteAgreement(classes, _site_key(path, where, entry))
    return roster


def load_keys(path: str | Path) -> dict[str, str]:
    """client id -> public key ("" = none) of every site on a roster, its classes unread (for `verify`)."""
    path = Path(path)
    keys = {}
    for cid, entry in _read_sites(path).items():
        check_client_id(cid)
        keys[cid] = _site_key(path, f"roster {path}, site {cid!r}", entry if isinstance(entry, dict) else {})
    return keys


def check_signature(client_id: str, public_key: str, manifest: dict | None) -> None:
    """With a key on the roster, the manifest must be signed by it; without one, anything goes (an unsigned
    module is accepted, and a signed one is checked against nothing)."""
    if public_key:
        try:
            verify_manifest(manifest or {}, public_key)
        except FedFactoryError as e:
            raise FedFactoryError(f"site {client_id!r}: module refused, {e}") from None


def check_agreement(roster: dict[str, SiteAgreement] | None, module) -> None:
    """A module within its site's agreement, or an error naming the site and what it broke."""
    if roster is None:
        return
    agreed = roster.get(module.client_id)
    if agreed is None:
        raise FedFactoryError(f"site {module.client_id!r} is not in the consortium's roster (federation.roster)")
    # first: what the manifest says is judged only once it is known to be the site's own
    check_signature(module.client_id, agreed.public_key, getattr(module, "saved_manifest", None))
    for c, n in zip(module.classes, module.counts):
        if c not in agreed.classes:
            raise FedFactoryError(f"site {module.client_id!r} declares class {c}, which its agreement does not "
                                  f"list (it may declare {sorted(agreed.classes)})")
        if n > agreed.classes[c]:
            raise FedFactoryError(f"site {module.client_id!r} claims {n:,} images of class {c}, over the "
                                  f"{agreed.classes[c]:,} of its agreement")
