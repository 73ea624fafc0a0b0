"""The factory: a class-balanced synthetic data set drawn from a set of generative modules.

Every (module, class) pair draws from its own stream, seeded by the run seed, the module's
client id and the class, and modules yield a fixed sequence of images per stream (see
SAMPLE_CHUNK): adding or removing a module never changes what the other modules generate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .errors import FedFactoryError
from .modules import GenerativeModule
from .utils import derive_seed


@dataclass
class SyntheticSet:
    images: np.ndarray          # uint8 N x H x W x C
    labels: np.ndarray          # int64 N
    sources: list[dict] = field(default_factory=list)   # {"client", "class", "n", "seed"} per draw
    missing_classes: list[int] = field(default_factory=list)

    def digest(self) -> str:
        """SHA-256 of the images and labels: equal digests mean byte-identical synthetic sets."""
        h = hashlib.sha256(self.images.tobytes())
        h.update(self.labels.tobytes())
        return h.hexdigest()


def plan(modules: list[GenerativeModule], num_classes: int, per_class: int,
         aggregation: str = "weighted") -> tuple[dict[int, list[tuple[str, int]]], list[int]]:
    """class -> [(client id, images to draw)], and the classes no module covers.

    'weighted' splits a shared class in proportion to each module's real count, 'uniform'
    equally; remainders go by largest fraction, ties by client id, so the plan is deterministic.
    """
    out, missing = {}, []
    for c in range(num_classes):
        holders = sorted((m.client_id, m.counts[m.classes.index(c)]) for m in modules if c in m.classes)
        if not holders:
            missing.append(c)
            continue
        weights = np.array([n if aggregation == "weighted" else 1 for _, n in holders], float)
        exact = per_class * weights / weights.sum()
        take = np.floor(exact).astype(int)
        for i in sorted(range(len(holders)), key=lambda i: (-(exact[i] - take[i]), holders[i][0]))[: per_class - take.sum()]:
            take[i] += 1
        out[c] = [(cid, int(n)) for (cid, _), n in zip(holders, take) if n > 0]
    return out, missing


def synthesize(modules: list[GenerativeModule], num_classes: int, per_class: int, seed: int,
               aggregation: str = "weighted", missing_classes: str = "error", class_names=None,
               progress: bool = True) -> SyntheticSet:
    ids = [m.client_id for m in modules]
    if len(set(ids)) != len(ids):
        raise FedFactoryError(f"two modules share a client id: {sorted(ids)}")
    by_id = {m.client_id: m for m in modules}
    draws, missing = plan(modules, num_classes, per_class, aggregation)
    if missing and missing_classes == "error":
        names = [class_names[c] if class_names else str(c) for c in missing]
        raise FedFactoryError(f"no module covers class(es) {', '.join(f'{c} ({n})' for c, n in zip(missing, names))}; "
                              "set factory.missing_classes=\"drop\" to leave them out")
    xs, ys, sources = [], [], []
    total = sum(n for d in draws.values() for _, n in d)
    with tqdm(total=total, desc="synthesis", unit="img", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for c, pairs in draws.items():
            for cid, n in pairs:
                s = derive_seed(seed, "synthesis", cid, c)
                xs.append(by_id[cid].sample(c, n, seed=s))
                ys.append(np.full(n, c, np.int64))
                sources.append({"client": cid, "class": c, "n": n, "seed": s})
                bar.update(n)
    if not xs:
        raise FedFactoryError("no module covers any class: nothing to synthesize")
    return SyntheticSet(np.concatenate(xs), np.concatenate(ys), sources, missing)
