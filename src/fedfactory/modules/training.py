"""How `GenerativeModule.fit` turns its training loop into optimizer steps: the trainer.

`fit` owns the loop (batches of uint8 pixels, the kind's loss, warm-up, EMA, progress); a trainer
decides the batch plan, wraps the optimizer, draws the batch indices and states what the run
spent. `Trainer` is plain minibatch training. DP-SGD is a trainer too (privacy/dp.py: `DPTrainer`),
which sits above this layer: modules never import privacy. A module built with `dp=` settings and
fitted without a trainer asks the trainer registered here under "dp" (privacy/ registers it when
it is imported); passing `fit(..., trainer=...)` is the explicit way.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..errors import FedFactoryError
from ..tensors import index_blocks
from ..utils import derive_seed

_TRAINERS: dict[str, Callable[[dict], "Trainer"]] = {}


class Trainer:
    """Plain training: uniform batches with replacement, drawn from the run seed and the client id."""

    def plan(self, module, n: int, batch: int, budget_images: int) -> tuple[int, int, int]:
        """(batch, steps, rows per image) for a site of n images and a budget of images seen."""
        return batch, max(1, math.ceil(budget_images / batch)), 1

    def prepare(self, module, net: torch.nn.Module, opt: torch.optim.Optimizer):
        """(the network the loss calls, the optimizer to step): torch.compile on a GPU when asked."""
        compiled = module.compile and module.device.type == "cuda"
        return (torch.compile(net) if compiled else net), opt

    def batches(self, module, n: int, batch: int, steps: int):
        """Per-step index tensors into the site's n images, on the module's device."""
        rng = np.random.default_rng(derive_seed(module.seed, module.client_id, "batches"))
        return index_blocks(rng, n, batch, steps, module.device)

    def after_backward(self, params: list, images: int, rows_per_image: int) -> None:
        """Called between the backward and the optimizer step (DP-SGD forms per-image gradients here)."""

    def finish(self) -> dict | None:
        """After the last step: the claim the manifest's privacy block states (None: nothing to state)."""
        return None


def register_trainer(name: str, factory: Callable[[dict], Trainer]) -> None:
    """Make `factory(settings)` the trainer of modules built with `name=` settings (today: "dp")."""
    _TRAINERS[name] = factory


def default_trainer(module) -> Trainer:
    """The trainer of a module fitted without one: plain, or the registered DP trainer for its `dp` settings."""
    if module.dp is None:
        return Trainer()
    if "dp" not in _TRAINERS:
        raise FedFactoryError("DP training needs a DP trainer: pass fit(..., trainer=fedfactory.privacy.DPTrainer(dp)) "
                              "or import fedfactory.privacy first")
    return _TRAINERS["dp"](module.dp)
