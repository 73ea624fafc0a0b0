import numpy as np
import pytest

from fedfactory.errors import FedFactoryError
from fedfactory.factory import plan, synthesize


class FakeModule:
    """A stand-in with the module interface: images encode (client, class, index) exactly."""

    def __init__(self, client_id, classes, counts):
        self.client_id, self.classes, self.counts = client_id, classes, counts

    def sample(self, class_id, n, seed):
        rng = np.random.default_rng(seed)
        return rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)


def test_weighted_and_uniform_plans():
    mods = [FakeModule("a", [0, 1], [300, 100]), FakeModule("b", [1], [300])]
    draws, missing = plan(mods, 3, 100, "weighted")
    assert draws[0] == [("a", 100)] and draws[1] == [("a", 25), ("b", 75)] and missing == [2]
    draws, _ = plan(mods, 3, 101, "uniform")
    assert dict(draws[1]) == {"a": 51, "b": 50}


def test_synthesis_is_balanced_and_module_removal_is_exact():
    mods = [FakeModule("a", [0], [10]), FakeModule("b", [1], [10]), FakeModule("c", [2], [10])]
    full = synthesize(mods, 3, 50, seed=7, progress=False)
    assert np.bincount(full.labels).tolist() == [50, 50, 50]
    part = synthesize([mods[0], mods[2]], 3, 50, seed=7, missing_classes="drop", progress=False)
    assert part.missing_classes == [1]
    for c in (0, 2):
        assert np.array_equal(full.images[full.labels == c], part.images[part.labels == c])


def test_missing_class_is_an_error_naming_it():
    with pytest.raises(FedFactoryError, match=r"class\(es\) 1 \(cat\)"):
        synthesize([FakeModule("a", [0], [5])], 2, 10, seed=0, class_names=["dog", "cat"], progress=False)
