"""The consortium's agreement, held by the coordinator: which site may declare which classes, the
most real images it may claim for each, and optionally the key its modules are signed with.

    # roster.toml (federation.roster = "roster.toml"; paths inside are relative to this file)
    [sites.hospital-a]
    classes = { "no tumour" = 1200 }     # class name (or id) -> the largest count it may claim
    public_key = "keys/hospital-a.pub"   # optional: its modules must carry its signature

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

MAX_KEY_BYTES = 1 << 14


@dataclass(frozen=True)
class SiteAgreement:
    classes: dict[int, int]   # class id -> the largest count the site may claim
    public_key: str = ""      # OpenSSH one-line public key text, "" = unsigned modules accepted


def load_roster(path: str | Path, class_names: list[str]) -> dict[str, SiteAgreement]:
    """client id -> its agreement; every name, class and count checked."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FedFactoryError(f"roster {path} not found (federation.roster)") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise FedFactoryError(f"roster {path} is not a readable TOML file: {e}") from None
    if set(data) != {"sites"} or not isinstance(data["sites"], dict) or not data["sites"]:
        raise FedFactoryError(f"roster {path} must hold [sites.<client id>] tables and nothing else")
    roster = {}
    for cid, entry in data["sites"].items():
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
        key = ""
        if "public_key" in entry:
            key_path = path.parent / str(entry["public_key"])
            try:
                if key_path.stat().st_size > MAX_KEY_BYTES:
                    raise FedFactoryError(f"{where}: {key_path} is too large for a public key")
                key = key_path.read_text().strip()
            except OSError as e:
                raise FedFactoryError(f"{where}: cannot read its public key {key_path}: {e.strerror or e}") from None
        roster[cid] = SiteAgreement(classes, key)
    return roster


def check_agreement(roster: dict[str, SiteAgreement] | None, module) -> None:
    """A module within its site's agreement, or an error naming the site and what it broke."""
    if roster is None:
        return
    agreed = roster.get(module.client_id)
    if agreed is None:
        raise FedFactoryError(f"site {module.client_id!r} is not in the consortium's roster (federation.roster)")
    for c, n in zip(module.classes, module.counts):
        if c not in agreed.classes:
            raise FedFactoryError(f"site {module.client_id!r} declares class {c}, which its agreement does not "
                                  f"list (it may declare {sorted(agreed.classes)})")
        if n > agreed.classes[c]:
            raise FedFactoryError(f"site {module.client_id!r} claims {n:,} images of class {c}, over the "
                                  f"{agreed.classes[c]:,} of its agreement")
