"""The factory: a class-balanced synthetic data set drawn from a set of generative modules.

Every (module, class) pair draws from its own stream, seeded by the run seed, the module's
client id and the class, and modules yield a fixed sequence of images per stream (see
SAMPLE_CHUNK): adding or removing a module never changes what the other modules generate.

So a draw is a pure function of (module, class, n, seed) and where it is sampled: a ShardStore
keeps each draw in RUN_DIR/synthetic/ and a resumed or unlearned run takes it from there instead
of sampling it again (sampling is most of a rebuild's time).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .errors import FedFactoryError
from .modules import GenerativeModule
from .utils import atomic_write_bytes, atomic_write_json, derive_seed


@dataclass
class SyntheticSet:
    images: np.ndarray          # uint8 N x H x W x C
    labels: np.ndarray          # int64 N
    sources: list[dict] = field(default_factory=list)   # {"client", "class", "n", "seed", "reused"} per draw
    missing_classes: list[int] = field(default_factory=list)
    crosscheck: dict = field(default_factory=dict)  # the modules' check of each other (crosscheck.py)

    def digest(self) -> str:
        """SHA-256 of the images and labels: equal digests mean byte-identical synthetic sets."""
        h = hashlib.sha256(self.images.tobytes())
        h.update(self.labels.tobytes())
        return h.hexdigest()


def plan(modules: list[GenerativeModule], num_classes: int, per_class: int, aggregation: str = "weighted",
         max_share: float = 1.0, excluded=frozenset()) -> tuple[dict[int, list[tuple[str, int]]], list[int]]:
    """class -> [(client id, images to draw)], and the classes no module covers.

    'weighted' splits a shared class in proportion to each module's real count, 'uniform'
    equally; either way no module supplies more than `max_share` of a class that others also
    hold (bounded influence: a site's declared counts cannot take a class). `excluded`: (client id,
    class) pairs left out (crosscheck.py). Remainders go by
    largest fraction, ties by client id, so the plan is deterministic.
    """
    out, missing = {}, []
    for c in range(num_classes):
        holders = sorted((m.client_id, m.counts[m.classes.index(c)]) for m in modules
                         if c in m.classes and (m.client_id, c) not in excluded)
        if not holders:
            missing.append(c)
            continue
        weights = np.array([n if aggregation == "weighted" else 1 for _, n in holders], float)
        exact = per_class * capped_shares(weights / weights.sum(), max_share)
        take = np.floor(exact).astype(int)
        for i in sorted(range(len(holders)), key=lambda i: (-(exact[i] - take[i]), holders[i][0]))[: per_class - take.sum()]:
            take[i] += 1
        out[c] = [(cid, int(n)) for (cid, _), n in zip(holders, take) if n > 0]
    return out, missing


def capped_shares(shares: np.ndarray, cap: float) -> np.ndarray:
    """Shares (summing to 1) with none above `cap` (at least an equal split), the excess handed to the
    uncapped in proportion to their shares (water-filling). A sole holder keeps everything."""
    cap = max(cap, 1.0 / len(shares))
    shares = shares.copy()
    while (over := shares > cap + 1e-12).any():
        free = ~over & (shares < cap - 1e-12)
        excess = (shares[over] - cap).sum()
        shares[over] = cap
        shares[free] += excess * shares[free] / shares[free].sum() if shares[free].sum() > 0 else excess / free.sum()
    return shares


def module_fingerprint(m: GenerativeModule) -> dict:
    """Everything besides (class, n, seed) that decides a module's images, as JSON."""
    manifest = getattr(m, "saved_manifest", None) or m.to_bytes()[1]  # unsaved: hash its weights all the same
    cuda = m.device.type == "cuda"
    return {"manifest": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
            "sampler": m.train_cfg,  # the live settings (sample_steps, sigma_min, guidance), even if changed after loading
            "device": m.device.type, "bf16": bool(m.bf16), "torch": torch.__version__, "fedfactory": __version__,
            # float results depend on the GPU model and kernels, and on a CPU on the thread count
            "gpu": [torch.cuda.get_device_name(m.device), torch.are_deterministic_algorithms_enabled()] if cuda else None,
            "threads": None if cuda else torch.get_num_threads()}


def shard_keys(modules: list[GenerativeModule], draws: dict[int, list[tuple[str, int]]], seed: int) -> dict:
    """(class, client id) -> the SHA-256 key of that draw's shard, for a plan's draws."""
    prints = {m.client_id: module_fingerprint(m) for m in modules}
    return {(c, cid): hashlib.sha256(json.dumps({"module": prints[cid], "class": int(c), "n": int(n),
                                                 "seed": derive_seed(seed, "synthesis", cid, c)},
                                                sort_keys=True).encode()).hexdigest()
            for c, pairs in draws.items() for cid, n in pairs}


SHARD_KEY = re.compile(r"[0-9a-f]{64}")


class ShardStore:
    """Kept draws: `<key>.npy` (uint8 n x H x W x C) per draw, and `index.json`: key -> {"client",
    "class", "n", "seed", "shape", "sha256" of the array bytes}.

    Only keys that shard_keys computed name files, never a string from the index or a peer. A shard
    that is missing, unreadable or differs from its index entry is a miss: the draw is sampled again
    and overwritten. Writes are atomic, the index after its shard, so a crash leaves at worst a
    shard the index does not list (a miss).
    """

    def __init__(self, folder: str | Path):
        self.folder, self.problems, self.writable = Path(folder), [], True
        self.index = {}
        try:
            index = json.loads((self.folder / "index.json").read_text()) if (self.folder / "index.json").exists() else {}
            if not isinstance(index, dict):
                raise ValueError("not a JSON object")
            self.index = {k: v for k, v in index.items() if SHARD_KEY.fullmatch(k) and isinstance(v, dict)}
        except (OSError, ValueError, RecursionError) as e:
            self.problems.append(f"index.json: {str(e)[:100]}")

    def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        entry = self.index.get(key)
        if entry is None:
            return None
        try:  # memory-mapped first: a header that claims a huge array allocates nothing
            x = np.load(self.folder / f"{key}.npy", mmap_mode="r", allow_pickle=False)
            if x.dtype != np.uint8 or x.shape != shape:
                raise ValueError(f"holds a {x.dtype} {list(x.shape)} array, not uint8 {list(shape)}")
            x = np.array(x, order="C")
            if hashlib.sha256(x.tobytes()).hexdigest() != entry.get("sha256"):
                raise ValueError("its SHA-256 differs from the index's")
            return x
        except Exception as e:  # noqa: BLE001  a kept shard is only a shortcut: anything wrong means sample again
            self.problems.append(f"{str(entry.get('client'))[:64]} class {entry.get('class')}: {str(e)[:100]}")
            return None

    def put(self, key: str, x: np.ndarray, meta: dict) -> None:
        if not self.writable:
            return
        buf = io.BytesIO()
        np.save(buf, x, allow_pickle=False)
        try:
            atomic_write_bytes(self.folder / f"{key}.npy", buf.getvalue())
            self.index[key] = {**meta, "shape": list(x.shape), "sha256": hashlib.sha256(x.tobytes()).hexdigest()}
            atomic_write_json(self.folder / "index.json", self.index)
        except OSError as e:  # a full disk costs the shortcut, not the run
            self.writable = False
            print(f"fedfactory: cannot keep synthetic shards in {self.folder} ({e.strerror or e}); going on without",
                  flush=True)

    def adopt(self, source: "ShardStore", keys) -> list[str]:
        """Copy the shards named by `keys` (and their index entries) from another run's store; the rest
        of it, such as a forgotten client's images, stays behind. Returns the keys copied."""
        copied = []
        for key in keys:
            if key in source.index:
                try:
                    atomic_write_bytes(self.folder / f"{key}.npy", (source.folder / f"{key}.npy").read_bytes())
                except OSError:
                    continue  # a missing shard is sampled again
                self.index[key] = source.index[key]
                copied.append(key)
        if copied:
            atomic_write_json(self.folder / "index.json", self.index)
        return copied


# many parameters because the factory's settings are keywords with defaults: callers (the server, a site
# in local mode, tests, benchmarks) name only those they change
def synthesize(modules: list[GenerativeModule], num_classes: int, per_class: int, seed: int,
               aggregation: str = "weighted", missing_classes: str = "error", class_names=None,
               progress: bool = True, store: ShardStore | None = None, max_share: float = 1.0,
               excluded=frozenset()) -> SyntheticSet:
    """`store`: where draws are kept and taken from (None: every draw is sampled); `max_share` and
    `excluded`: see plan."""
    ids = [m.client_id for m in modules]
    if len(set(ids)) != len(ids):
        raise FedFactoryError(f"two modules share a client id: {sorted(ids)}")
    by_id = {m.client_id: m for m in modules}
    draws, missing = plan(modules, num_classes, per_class, aggregation, max_share, excluded)
    if missing and missing_classes == "error":
        names = [class_names[c] if class_names else str(c) for c in missing]
        raise FedFactoryError(f"no module covers class(es) {', '.join(f'{c} ({n})' for c, n in zip(missing, names))}; "
                              "set factory.missing_classes=\"drop\" to leave them out")
    keys = shard_keys(modules, draws, seed) if store is not None else {}
    xs, ys, sources = [], [], []
    total = sum(n for d in draws.values() for _, n in d)
    with tqdm(total=total, desc="synthesis", unit="img", disable=None if progress else True, leave=False, dynamic_ncols=True) as bar:
        for c, pairs in draws.items():
            for cid, n in pairs:
                m, s = by_id[cid], derive_seed(seed, "synthesis", cid, c)
                x = store.get(keys[c, cid], (n, *m.image_shape)) if store is not None else None
                reused = x is not None
                if not reused:
                    x = m.sample(c, n, seed=s)
                    if store is not None:
                        store.put(keys[c, cid], x, {"client": cid, "class": c, "n": n, "seed": s})
                xs.append(x)
                ys.append(np.full(n, c, np.int64))
                sources.append({"client": cid, "class": c, "n": n, "seed": s, "reused": reused})
                bar.update(n)
    if store is not None and store.problems:  # said once, after the progress bar
        print(f"fedfactory: {len(store.problems)} kept synthetic shard(s) in {store.folder} did not verify and were "
              f"sampled again (first: {store.problems[0]})", flush=True)
        store.problems.clear()
    if not xs:
        raise FedFactoryError("no module covers any class: nothing to synthesize")
    return SyntheticSet(np.concatenate(xs), np.concatenate(ys), sources, missing)
