"""Seeds derived from stable names, the weight EMA, training-loss curves, and atomic file writes."""

from __future__ import annotations

import csv
import hashlib
import io
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


class LossCurve:
    """A training loop's loss every `every` steps (the mean over those steps), for a curve of 100 to 200
    points (`steps` of them below 200). The points stay on the device: reading one waits for all queued
    work, so `read` reads them all at once, at the end, with the loop's last running loss."""

    def __init__(self, steps: int, batch: int, points: int = 100):
        self.steps, self.batch, self.every = steps, batch, max(1, steps // points)
        self.sum, self.n, self.points = None, 0, []  # points: (step, device mean)

    def add(self, step: int, loss: torch.Tensor | None) -> None:
        """After step `step` (0-based), its detached loss (None: a step without one, a DP step of noise alone)."""
        if loss is not None:
            self.sum, self.n = (loss if self.sum is None else self.sum + loss), self.n + 1
        if self.n and ((step + 1) % self.every == 0 or step + 1 == self.steps):
            self.points.append((step + 1, self.sum / self.n))
            self.sum, self.n = None, 0

    def read(self, last: torch.Tensor) -> tuple[float, list[dict]]:
        """(`last` as a float, the points as {"step", "images_seen", "loss"}): one read from the device.
        images_seen counts `batch` images a step (with DP, the expected count)."""
        values = torch.stack([last.double(), *(v.double() for _, v in self.points)]).tolist()
        return values[0], [{"step": s, "images_seen": s * self.batch, "loss": v}
                           for (s, _), v in zip(self.points, values[1:])]


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


def atomic_write_csv(path: str | Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    """A CSV with a header, one row per dict (a missing key is a blank cell, a key not in `columns` is left out)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, restval="", extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


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
