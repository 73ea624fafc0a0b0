"""Modules checked by each other where they share a class, with no patient image at the coordinator.

A module that declares a class should draw images that look like the other holders' images of that
class. Each module draws `n` images of each of its classes; in a fixed random-convolution feature
space (privacy.audit.random_features: no download, no training, nothing to game), by the distance
of their feature means, two holders of a class vouch for each other when their draws of it are
nearer each other than either is to any third module's draw of another class. A holder agrees when
another holder vouches for it.

    report = cross_check(modules, num_classes, n=100, seed=0)
    report["flagged"]    # client id -> classes it is dropped from
    report["untrusted"]  # modules flagged on most of the classes they share: dropped from every class

Where one holder of a class agrees and another does not, the one that does not is flagged. Where no
holder agrees (two holders, one of them lying, each find the other unlike themselves), the holder
that disagrees with the federation on more classes overall is flagged: a liar that claims every
class contradicts every honest site, an honest site contradicts only the liar. A class that only
one module holds cannot be checked by anyone.
"""

from __future__ import annotations

import numpy as np
import torch

from .modules import GenerativeModule
from .privacy.audit import random_features
from .utils import derive_seed


def cross_check(modules: list[GenerativeModule], num_classes: int, n: int, seed: int) -> dict:
    holders = {c: sorted(m.client_id for m in modules if c in m.classes) for c in range(num_classes)}
    shared = [c for c, h in holders.items() if len(h) > 1]
    if not shared or n <= 0:
        return {"checked": [], "flagged": {}, "untrusted": [], "agrees": {}}
    draws = [(m.client_id, c) for m in sorted(modules, key=lambda m: m.client_id) for c in m.classes]
    by_id = {m.client_id: m for m in modules}
    means = torch.stack([random_features(by_id[cid].sample(c, n, seed=derive_seed(seed, "crosscheck", cid, c))).mean(0)
                         for cid, c in draws])
    dist = torch.cdist(means.double(), means.double()).numpy()
    row = {d: i for i, d in enumerate(draws)}
    agrees = {}
    for c in shared:
        for cid in holders[c]:
            agrees[cid, c] = any(_vouch(dist, draws, row, c, cid, other) for other in holders[c] if other != cid)
    disagreements = {cid: sum(not a for (o, _), a in agrees.items() if o == cid) for cid in by_id}
    flagged: dict[str, list[int]] = {}
    for c in shared:
        wrong = [cid for cid in holders[c] if not agrees[cid, c]]
        if len(wrong) == len(holders[c]):  # nobody agrees: blame whoever contradicts the most sites
            worst = max(disagreements[cid] for cid in wrong)
            wrong = [cid for cid in wrong if disagreements[cid] == worst] if \
                sum(disagreements[cid] == worst for cid in wrong) < len(wrong) else []
        for cid in wrong:
            flagged.setdefault(cid, []).append(c)
    untrusted = sorted(cid for cid, cs in flagged.items()
                       if len(cs) > 1 and len(cs) > sum(c in shared for c in by_id[cid].classes) / 2)
    return {"checked": shared, "flagged": flagged, "untrusted": untrusted,
            "agrees": {f"{cid}/{c}": bool(a) for (cid, c), a in agrees.items()}}


def _vouch(dist: np.ndarray, draws: list, row: dict, c: int, a: str, b: str) -> bool:
    """Are a's and b's draws of class c nearer each other than either is to a third module's other class?"""
    i, j = row[a, c], row[b, c]
    third = [row[d] for d in draws if d[0] not in (a, b) and d[1] != c]
    return bool(third) and dist[i, j] < min(dist[i, third].min(), dist[j, third].min())


def excluded_draws(report: dict, modules: list[GenerativeModule]) -> set[tuple[str, int]]:
    """(client id, class) pairs the factory leaves out: flagged pairs, and every class of an untrusted module."""
    out = {(cid, c) for cid, cs in report["flagged"].items() for c in cs}
    return out | {(m.client_id, c) for m in modules if m.client_id in report["untrusted"] for c in m.classes}
