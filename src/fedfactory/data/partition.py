"""Partitions of a training set over clients: silos, pathological:k, dirichlet:alpha, iid, natural.

Dirichlet, pathological (client i holds classes i .. i+k-1 mod C) and IID use flwr-datasets'
partitioners; silos and natural are a direct assignment. Every partition is seeded and reports its client x class counts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import FedFactoryError

SCHEMES = ("silos", "pathological:<k>", "dirichlet:<alpha>", "iid", "natural")


def client_id(i: int) -> str:
    return f"client-{i}"


@dataclass
class Partition:
    """client id -> indices into the training set, and the client x class counts."""

    scheme: str
    num_classes: int
    indices: dict[str, np.ndarray]
    counts: dict[str, list[int]]

    @property
    def clients(self) -> list[str]:
        return list(self.indices)

    def table(self, class_names: list[str] | None = None) -> str:
        names = class_names or [str(c) for c in range(self.num_classes)]
        head = ["client"] + [n[:10] for n in names] + ["total"]
        rows = [[cid] + [str(v) for v in cnt] + [str(sum(cnt))] for cid, cnt in self.counts.items()]
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        fmt = lambda r: "  ".join(s.rjust(w) for s, w in zip(r, widths))  # noqa: E731
        return "\n".join([fmt(head)] + [fmt(r) for r in rows])


def _parse(scheme: str) -> tuple[str, float | None]:
    kind, _, arg = scheme.partition(":")
    kind = kind.strip().lower()
    if kind in ("silos", "iid", "natural"):
        if arg:
            raise FedFactoryError(f"partition scheme {kind} takes no argument, got {scheme!r}")
        return kind, None
    if kind in ("pathological", "dirichlet"):
        try:
            value = float(arg)
        except ValueError:
            raise FedFactoryError(f"partition scheme {scheme!r}: use {kind}:<number>, e.g. {kind}:{'2' if kind == 'pathological' else '0.1'}") from None
        if kind == "dirichlet" and value <= 0:
            raise FedFactoryError(f"dirichlet alpha must be > 0, got {arg}")
        if kind == "pathological" and (value < 1 or value != int(value)):
            raise FedFactoryError(f"pathological:k needs a whole number k >= 1, got {arg}")
        return kind, value
    raise FedFactoryError(f"unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}")


def _flwr_partition(labels: np.ndarray, partitioner) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import datasets

        datasets.disable_progress_bars()
        partitioner.dataset = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(len(labels))})
        return [np.sort(np.asarray(partitioner.load_partition(i)["idx"], np.int64))
                for i in range(partitioner.num_partitions)]


def make_partition(labels: np.ndarray, scheme: str, num_clients: int, seed: int = 0,
                   num_classes: int | None = None, groups: np.ndarray | None = None,
                   min_size: int = 10) -> Partition:
    """Split training indices over `num_clients` clients by `scheme`, reproducibly from `seed`."""
    labels = np.asarray(labels, np.int64)
    num_classes = int(num_classes or labels.max() + 1)
    kind, arg = _parse(scheme)
    if kind != "natural" and num_clients < 1:
        raise FedFactoryError(f"the number of clients must be >= 1, got {num_clients}")
    present = np.unique(labels)

    if kind == "silos":
        if num_clients > len(present):
            raise FedFactoryError(
                f"silos gives each class to exactly one client: {num_clients} clients but only {len(present)} classes"
            )
        # Class c goes to client (rank of c) mod N: with N = C, client k holds exactly class k.
        owner = {int(c): r % num_clients for r, c in enumerate(present)}
        parts = [np.flatnonzero(np.isin(labels, [c for c, o in owner.items() if o == k])) for k in range(num_clients)]
    elif kind == "natural":
        if groups is None:
            raise FedFactoryError("partition scheme natural needs a data set with its own client ids (e.g. isic2019)")
        ids = np.unique(groups)
        parts = [np.flatnonzero(groups == g) for g in ids]
    else:
        if num_clients > len(labels):
            raise FedFactoryError(f"{scheme} over {num_clients} clients leaves clients empty: only {len(labels)} images")
        from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

        if kind == "iid":
            partitioner = IidPartitioner(num_partitions=num_clients)
        elif kind == "dirichlet":
            partitioner = DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=arg,
                                               min_partition_size=min_size, self_balancing=False, seed=seed)
        else:
            k = int(arg)
            if k > len(present):
                raise FedFactoryError(f"pathological:{k} asks for more classes per client than the {len(present)} classes present")
            partitioner = PathologicalPartitioner(num_partitions=num_clients, partition_by="label",
                                                  num_classes_per_partition=k,
                                                  class_assignment_mode="deterministic", seed=seed)
        try:
            parts = _flwr_partition(labels, partitioner)
        except (ValueError, IndexError) as e:
            raise FedFactoryError(f"cannot partition with {scheme} over {num_clients} clients: {e}") from None

    indices = {client_id(i): p for i, p in enumerate(parts)}
    empty = [cid for cid, p in indices.items() if len(p) == 0]
    if empty:
        raise FedFactoryError(f"{scheme} over {num_clients} clients leaves {', '.join(empty)} empty: use fewer clients")
    counts = {cid: np.bincount(labels[p], minlength=num_classes).tolist() for cid, p in indices.items()}
    return Partition(scheme, num_classes, indices, counts)
