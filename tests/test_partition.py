import numpy as np
import pytest

from fedfactory.data import make_partition
from fedfactory.errors import FedFactoryError

LABELS = np.repeat(np.arange(10), 100)


def test_silos_one_class_per_client():
    p = make_partition(LABELS, "silos", 10)
    assert p.clients == [f"client-{i}" for i in range(10)]
    for i, cid in enumerate(p.clients):
        assert p.counts[cid][i] == 100 and sum(p.counts[cid]) == 100
    all_idx = np.concatenate(list(p.indices.values()))
    assert len(np.unique(all_idx)) == len(LABELS)


def test_silos_fewer_clients_than_classes_is_label_exclusive():
    p = make_partition(LABELS, "silos", 3)
    owners = [[cid for cid in p.clients if p.counts[cid][c] > 0] for c in range(10)]
    assert all(len(o) == 1 for o in owners)
    assert all(p.counts[o[0]][c] == 100 for c, o in enumerate(owners))


def test_pathological_k_classes_each():
    p = make_partition(LABELS, "pathological:2", 10)
    for i, cid in enumerate(p.clients):
        present = [c for c, n in enumerate(p.counts[cid]) if n]
        assert present == sorted({i % 10, (i + 1) % 10})
    assert sum(sum(c) for c in p.counts.values()) == len(LABELS)


def test_dirichlet_is_seeded_skewed_and_respects_min_size():
    a = make_partition(LABELS, "dirichlet:0.1", 5, seed=1, min_size=20)
    b = make_partition(LABELS, "dirichlet:0.1", 5, seed=1, min_size=20)
    c = make_partition(LABELS, "dirichlet:0.1", 5, seed=2, min_size=20)
    assert a.counts == b.counts and a.counts != c.counts
    assert min(sum(v) for v in a.counts.values()) >= 20
    # alpha = 0.1: most of each client's data sits in few classes
    top = [max(v) / sum(v) for v in a.counts.values()]
    assert np.mean(top) > 0.4


def test_iid_and_natural():
    p = make_partition(LABELS, "iid", 4)
    assert all(abs(sum(v) - 250) <= 1 for v in p.counts.values())
    groups = np.arange(len(LABELS)) % 3
    q = make_partition(LABELS, "natural", 0, groups=groups)
    assert len(q.clients) == 3 and all(np.all(groups[i] == groups[i][0]) for i in q.indices.values())


@pytest.mark.parametrize("scheme, clients, msg", [
    ("silos", 11, "only 10 classes"),
    ("dirichlet:0", 3, "alpha must be > 0"),
    ("dirichlet:-1", 3, "alpha must be > 0"),
    ("dirichlet:x", 3, "dirichlet:<number>"),
    ("pathological:1.5", 3, "whole number"),
    ("ring", 3, "unknown partition scheme"),
    ("natural", 3, "own client ids"),
    ("iid", 0, ">= 1"),
    ("iid", 2000, "empty"),
])
def test_bad_partitions(scheme, clients, msg):
    with pytest.raises(FedFactoryError, match=msg):
        make_partition(LABELS, scheme, clients)
