"""Seeds derived from stable names, the weight EMA, and atomic file writes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib.metadata import entry_points
from pathlib import Path

import torch

from .errors import FedFactoryError


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed from the run seed and stable names (client id, class, stage).

    Streams keyed by names, never by call order, keep runs repeatable and unlearning exact.
    """
    key = "/".join([str(int(seed)), *map(str, names)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


@torch.no_grad()
def ema_step(ema_tensors: list, net_tensors: list, batch: int, seen: int, halflife_images: float) -> None:
    """Move an exponential moving average of weights towards the network after a step of `batch` images.

    The half-life is in images and ramps up as EDM's does (at most a tenth of the images seen so far),
    so a run far shorter than the half-life still averages what it learned."""
    halflife = min(halflife_images, seen * 0.1)
    torch._foreach_lerp_(ema_tensors, net_tensors, 1.0 - 0.5 ** (batch / max(halflife, 1e-8)))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The permissions a plain open()/mkdir() would give (mkstemp/mkdtemp make private files)."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def entry_point_objects(group: str) -> list[tuple[str, object]]:
    """(name, loaded object) of every entry point in `group` of the installed packages; a plugin that
    does not load is named in one line, not hidden."""
    out = []
    for ep in entry_points(group=group):
        try:
            out.append((ep.name, ep.load()))
        except Exception as e:
            raise FedFactoryError(f"entry point {ep.name!r} in {group} ({ep.value}) "
                                  f"does not load: {type(e).__name__}: {str(e)[:200]}") from None
    return out
