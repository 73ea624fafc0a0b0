"""Weight-averaging federated learning: FedAvg, FedProx, SCAFFOLD and FedDyn.

In the shape of Flower's `Strategy`: `Averaging` runs FedAvg's loop (sample clients, local SGD
from the global model, server update) and calls small hooks; each algorithm is a short subclass
that overrides the hooks its paper changes, so each reads like its update rule:
  FedAvg   (McMahan et al. 2017)  local SGD, server takes the example-weighted mean.
  FedProx  (Li et al. 2020)       local loss + mu/2 ||w - w_global||^2.
  SCAFFOLD (Karimireddy et al. 2020, option II) local gradient corrected by c - c_i; control
           variates c_i+ = c_i - c + (x - y_i) / (K lr); server x += lr_g mean(dy), c += |S|/N mean(dc).
  FedDyn   (Acar et al. 2021)     local loss - <g_k, w> + alpha/2 ||w - w_global||^2, with
           g_k -= alpha (w_k - w_global); server h -= alpha/N sum(w_k - w_global),
           w_global = mean(w_k) - h / alpha.
A strategy's parameters are its fields (scikit-learn's rule: the constructor only stores them);
what it learns during a run (control variates, FedDyn's h and g_k) is set up by `fit`.
The example-weighted mean is Flower's own `aggregate`. Models are any torch module; clients are
functions that yield their local batches for a round, so the same code trains a ResNet on images
or a 1-D quadratic in the unit tests.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

import numpy as np
import torch
from flwr.server.strategy.aggregate import aggregate

from ..errors import FedFactoryError
from ..utils import derive_seed

Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # round -> local batches


@dataclass
class FLClient:
    cid: str
    num_examples: int
    batches: Batches


def state_bytes(net: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in net.state_dict().values())


def _zeros(net) -> list[torch.Tensor]:
    return [torch.zeros_like(p) for p in net.parameters()]


def _sq_dist(w, w_global) -> torch.Tensor:
    return sum(((p - g) ** 2).sum() for p, g in zip(w, w_global))


def _mean(per_client: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per tensor, the plain mean over the clients of the round (as SCAFFOLD and FedDyn write it)."""
    return [torch.stack(ts).mean(0) for ts in zip(*per_client)]


@dataclass
class Averaging:
    """FedAvg's loop with the hooks the other algorithms override.

    lr, weight_decay  the clients' plain SGD; fraction  the share of clients sampled each round.
    """

    lr: float = 0.05
    fraction: float = 1.0
    weight_decay: float = 0.0
    name = "fedavg"  # the config's name; also seeds the client sampling, one stream per algorithm

    # hooks: FedAvg's behaviour here, one override per change an algorithm makes

    def init_state(self, net: torch.nn.Module, clients: list[FLClient]) -> None:
        """Server and per-client state that lives across rounds."""

    def local_loss(self, loss: torch.Tensor, w: list[torch.Tensor], w_global: list[torch.Tensor], cid: str):
        """The client's objective at its parameters `w`, from its data loss."""
        return loss

    def correct_grad(self, w: list[torch.Tensor], cid: str) -> None:
        """Edit the gradients in place between backward and the SGD step."""

    def client_update(self, cid: str, w: list[torch.Tensor], w_global: list[torch.Tensor], steps: int):
        """After the client's local steps: update its state; returns what it sends besides its model."""
        return None

    def server_update(self, w_global, mean, local_ws, extras, n: int) -> list[torch.Tensor]:
        """The new global parameters from the example-weighted `mean`, the clients' parameters
        `local_ws` and messages `extras`, out of `n` clients in all."""
        return mean

    def message_bytes(self, net: torch.nn.Module) -> int:
        """Bytes one client receives, and sends, per round."""
        return state_bytes(net)

    # the loop

    def fit(self, net: torch.nn.Module, clients: list[FLClient], loss_fn: Callable, rounds: int, seed: int,
            on_round: Callable[[int, torch.nn.Module], None] | None = None) -> dict:
        """Train `net` in place for `rounds` rounds; returns communication counts."""
        if not 0 < self.fraction <= 1:
            raise FedFactoryError(f"client fraction must be in (0, 1], got {self.fraction}")
        self.init_state(net, clients)
        rng = np.random.default_rng(derive_seed(seed, self.name, "selection"))
        n, sent = len(clients), 0
        for r in range(rounds):
            chosen = sorted(rng.choice(n, max(1, int(round(self.fraction * n))), replace=False).tolist())
            w_global = [p.detach().clone() for p in net.parameters()]
            results = [self.local_fit(net, clients[i], loss_fn, r, w_global) for i in chosen]
            sent += len(results) * self.message_bytes(net)
            self.aggregate_fit(net, w_global, results, n)
            if on_round is not None:
                on_round(r, net)
        return {"rounds": rounds, "uploaded_bytes": sent, "downloaded_bytes": sent}

    def local_fit(self, net, client: FLClient, loss_fn: Callable, r: int, w_global: list[torch.Tensor]):
        """One client's round: SGD on its local objective from the global model."""
        local = copy.deepcopy(net).train()
        opt = torch.optim.SGD(local.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        w, steps = list(local.parameters()), 0
        for x, y in client.batches(r):
            loss = self.local_loss(loss_fn(local, x, y), w, w_global, client.cid)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            self.correct_grad(w, client.cid)
            opt.step()
            steps += 1
        extra = self.client_update(client.cid, [p.detach() for p in w], w_global, steps)
        return local, client.num_examples, extra

    def aggregate_fit(self, net, w_global, results, n: int) -> None:
        """Flower's example-weighted mean of every tensor (BatchNorm statistics too), then the
        algorithm's own update of the parameters."""
        mean = aggregate([([t.detach().cpu().numpy() for t in loc.state_dict().values()], ne) for loc, ne, _ in results])
        sd = {k: torch.as_tensor(a, dtype=v.dtype) for (k, v), a in zip(net.state_dict().items(), mean)}
        keys = [k for k, _ in net.named_parameters()]
        local_ws = [[p.detach() for p in loc.parameters()] for loc, _, _ in results]
        extras = [e for _, _, e in results]
        sd.update(zip(keys, self.server_update(w_global, [sd[k] for k in keys], local_ws, extras, n)))
        net.load_state_dict(sd)


class FedAvg(Averaging):
    """McMahan et al. 2017: local SGD, the server takes the example-weighted mean (the base loop)."""


@dataclass
class FedProx(Averaging):
    """Li et al. 2020: local loss + mu/2 ||w - w_global||^2 keeps local models near the global one."""

    mu: float = 0.01
    name = "fedprox"

    def local_loss(self, loss, w, w_global, cid):
        return loss + self.mu / 2 * _sq_dist(w, w_global)


@dataclass
class SCAFFOLD(Averaging):
    """Karimireddy et al. 2020, option II: control variates c (server) and c_i (client) estimate the
    gradient drift; each local gradient is corrected by c - c_i. server_lr: lr_g of the server step."""

    server_lr: float = 1.0
    name = "scaffold"

    def init_state(self, net, clients):
        self.c, self.c_i = _zeros(net), {cl.cid: _zeros(net) for cl in clients}

    def correct_grad(self, w, cid):
        for p, c, ci in zip(w, self.c, self.c_i[cid]):
            p.grad.add_(c - ci)

    def client_update(self, cid, w, w_global, steps):
        """c_i+ = c_i - c + (x - y_i) / (K lr); the client sends dc = c_i+ - c_i."""
        if not steps:  # no local step, no new estimate of the drift
            return [torch.zeros_like(c) for c in self.c]
        new = [ci - c + (x - y) / (steps * self.lr) for ci, c, x, y in zip(self.c_i[cid], self.c, w_global, w)]
        dc = [a - b for a, b in zip(new, self.c_i[cid])]
        self.c_i[cid] = new
        return dc

    def server_update(self, w_global, mean, local_ws, extras, n):
        """x += lr_g mean(dy); c += |S|/N mean(dc)."""
        self.c = [c + len(extras) / n * dc for c, dc in zip(self.c, _mean(extras))]
        dy = _mean([[y - x for y, x in zip(w, w_global)] for w in local_ws])
        return [x + self.server_lr * d for x, d in zip(w_global, dy)]

    def message_bytes(self, net):
        # the model and, both ways, the control variates (c down, dc up)
        return state_bytes(net) + sum(p.numel() * p.element_size() for p in net.parameters())


@dataclass
class FedDyn(Averaging):
    """Acar et al. 2021: a dynamic regulariser, local loss - <g_k, w> + alpha/2 ||w - w_global||^2,
    whose linear term (g_k, the client's last gradient) makes the local optima agree with the global one."""

    alpha: float = 0.01
    name = "feddyn"

    def init_state(self, net, clients):
        self.h, self.g_k = _zeros(net), {cl.cid: _zeros(net) for cl in clients}

    def local_loss(self, loss, w, w_global, cid):
        return loss + self.alpha / 2 * _sq_dist(w, w_global) - sum((p * g).sum() for p, g in zip(w, self.g_k[cid]))

    def client_update(self, cid, w, w_global, steps):
        """g_k -= alpha (w_k - w_global)."""
        self.g_k[cid] = [g - self.alpha * (p - x) for g, p, x in zip(self.g_k[cid], w, w_global)]

    def server_update(self, w_global, mean, local_ws, extras, n):
        """h -= alpha/N sum(w_k - w_global); w_global = mean(w_k) - h / alpha."""
        dw = [[p - x for p, x in zip(w, w_global)] for w in local_ws]
        self.h = [h - self.alpha / n * torch.stack(d).sum(0) for h, d in zip(self.h, zip(*dw))]
        return [x + m - h / self.alpha for x, m, h in zip(w_global, _mean(dw), self.h)]


ALGORITHMS = {s.name: s for s in (FedAvg, FedProx, SCAFFOLD, FedDyn)}


def make_strategy(name: str, **params) -> Averaging:
    """The strategy called `name` with those of `params` it takes: a config names every
    algorithm's parameters (FedProx's mu, FedDyn's alpha), each strategy keeps its own."""
    if name not in ALGORITHMS:
        raise FedFactoryError(f"unknown averaging algorithm {name!r}; use one of {', '.join(ALGORITHMS)}")
    cls = ALGORITHMS[name]
    return cls(**{f.name: params[f.name] for f in fields(cls) if f.name in params})
