"""What the runners of a simulated federation share: the public data set, partitioned over the
simulated sites (the embedded runner, a Flower SuperNode given a partition-id, compare, unlearn),
and the quality report's reference classifier trained on the sites' real images.
"""

from __future__ import annotations

import numpy as np

from ..config import Config
from ..data import Dataset, Partition, cap_per_class, load_dataset, make_partition
from ..errors import FedFactoryError
from ..quality import train_reference
from ..runtime import classifier_kw
from ..utils import derive_seed


def prepare_data(cfg: Config) -> tuple[Dataset, Partition]:
    """Load the public data set (capped per class for toy runs) and partition it over simulated sites."""
    d = cfg.data
    ds = load_dataset(d.name, root=d.root, size=d.size, download=d.download)
    if d.classes and d.classes != ds.class_names:
        raise FedFactoryError(f"data.classes {d.classes} differs from {ds.name}'s classes {ds.class_names}")
    if d.train_per_class > 0:
        keep = cap_per_class(ds.y_train, d.train_per_class, derive_seed(cfg.seed, "subsample", "train"))
        ds.x_train, ds.y_train = ds.x_train[keep], ds.y_train[keep]
        if ds.groups_train is not None:
            ds.groups_train = ds.groups_train[keep]
    p = cfg.partition
    part = make_partition(ds.y_train, p.scheme, p.clients, seed=cfg.seed, num_classes=ds.num_classes,
                          groups=ds.groups_train, min_size=p.min_size)
    unknown = sorted(set(p.exclude) - set(part.clients))
    if unknown:
        raise FedFactoryError(f"partition.exclude names unknown clients {unknown}; clients are {part.clients}")
    for cid in p.exclude:
        del part.indices[cid], part.counts[cid]
    if not part.indices:
        raise FedFactoryError("partition.exclude leaves no client in the federation")
    return ds, part


def site_data(ds: Dataset, part: Partition, cid: str):
    """What a simulated site holds: its share of the training set, nothing else."""
    idx = part.indices[cid]
    return ds.x_train[idx], ds.y_train[idx]


def sites_reference(cfg: Config, ds: Dataset, part: Partition):
    """The feature network of the modules' quality report, trained on the participating sites' real
    images (so a federation without a site, e.g. after unlearning, has one that never saw it); None
    when quality.reference_budget is 0."""
    if cfg.quality.reference_budget <= 0:
        return None
    idx = np.concatenate([part.indices[cid] for cid in part.clients])
    return train_reference(cfg, ds.x_train[idx], ds.y_train[idx], ds.num_classes, classifier_kw(cfg, ds.augment))[0]
