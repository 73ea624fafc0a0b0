"""Weight-averaging federated learning: FedAvg, FedProx, SCAFFOLD and FedDyn.

One loop, four algorithms, each as its paper writes it:
  FedAvg   (McMahan et al. 2017)  local SGD, server takes the example-weighted mean.
  FedProx  (Li et al. 2020)       local loss + mu/2 ||w - w_global||^2.
  SCAFFOLD (Karimireddy et al. 2020, option II) local gradient corrected by c - c_i; control
           variates c_i+ = c_i - c + (x - y_i) / (K lr); server x += lr_g mean(dy), c += |S|/N mean(dc).
  FedDyn   (Acar et al. 2021)     local loss - <g_k, w> + alpha/2 ||w - w_global||^2, with
           g_k -= alpha (w_k - w_global); server h -= alpha/N sum(w_k - w_global),
           w_global = mean(w_k) - h / alpha.
The example-weighted mean is Flower's own `aggregate`. Models are any torch module; clients are
functions that yield their local batches for a round, so the same code trains a ResNet on images
or a 1-D quadratic in the unit tests.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.server.strategy.aggregate import aggregate

from ..errors import FedFactoryError
from ..utils import derive_seed

ALGORITHMS = ("fedavg", "fedprox", "scaffold", "feddyn")
Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # round -> local batches


@dataclass
class FLClient:
    cid: str
    num_examples: int
    batches: Batches


def _params(net) -> list[torch.Tensor]:
    return [p for p in net.parameters()]


def state_bytes(net: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in net.state_dict().values())


def federated_training(algorithm: str, net: torch.nn.Module, clients: list[FLClient],
                       loss_fn: Callable, rounds: int, lr: float, seed: int, fraction: float = 1.0,
                       mu: float = 0.01, alpha: float = 0.01, server_lr: float = 1.0, weight_decay: float = 0.0,
                       on_round: Callable[[int, torch.nn.Module], None] | None = None, progress=None) -> dict:
    """Train `net` in place for `rounds` rounds; returns communication counts."""
    if algorithm not in ALGORITHMS:
        raise FedFactoryError(f"unknown averaging algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
    if not 0 < fraction <= 1:
        raise FedFactoryError(f"client fraction must be in (0, 1], got {fraction}")
    n = len(clients)
    zeros = lambda: [torch.zeros_like(p) for p in _params(net)]  # noqa: E731
    c_server, c_client = zeros(), {cl.cid: zeros() for cl in clients}       # SCAFFOLD
    h_server, g_client = zeros(), {cl.cid: zeros() for cl in clients}       # FedDyn
    rng = np.random.default_rng(derive_seed(seed, algorithm, "selection"))
    model_bytes = state_bytes(net)
    extra = sum(p.numel() * p.element_size() for p in _params(net)) if algorithm == "scaffold" else 0
    up = down = 0
    for r in range(rounds):
        m = max(1, int(round(fraction * n)))
        chosen = sorted(rng.choice(n, m, replace=False).tolist())
        global_params = [p.detach().clone() for p in _params(net)]
        results = []
        for i in chosen:
            cl = clients[i]
            local = copy.deepcopy(net).train()
            opt = torch.optim.SGD(local.parameters(), lr=lr, weight_decay=weight_decay)
            steps = 0
            for x, y in cl.batches(r):
                loss = loss_fn(local, x, y)
                lp = _params(local)
                if algorithm in ("fedprox", "feddyn"):
                    coef = mu if algorithm == "fedprox" else alpha
                    loss = loss + coef / 2 * sum(((p - g) ** 2).sum() for p, g in zip(lp, global_params))
                if algorithm == "feddyn":
                    loss = loss - sum((p * g).sum() for p, g in zip(lp, g_client[cl.cid]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if algorithm == "scaffold":
                    for p, c, ci in zip(lp, c_server, c_client[cl.cid]):
                        p.grad.add_(c - ci)
                opt.step()
                steps += 1
            lp = [p.detach() for p in _params(local)]
            if algorithm == "scaffold" and steps:
                new_ci = [ci - c + (g - p) / (steps * lr) for ci, c, g, p in zip(c_client[cl.cid], c_server, global_params, lp)]
                delta_c = [a - b for a, b in zip(new_ci, c_client[cl.cid])]
                c_client[cl.cid] = new_ci
                results.append((local, cl.num_examples, delta_c))
            else:
                if algorithm == "feddyn":
                    g_client[cl.cid] = [gk - alpha * (p - g) for gk, p, g in zip(g_client[cl.cid], lp, global_params)]
                results.append((local, cl.num_examples, None))
            down += model_bytes + extra
            up += model_bytes + extra

        # server
        new_state = aggregate([([t.detach().cpu().numpy() for t in loc.state_dict().values()], ne)
                               for loc, ne, _ in results])
        sd = net.state_dict()
        for key, avg in zip(sd, new_state):
            sd[key] = torch.as_tensor(avg, dtype=sd[key].dtype)
        if algorithm in ("scaffold", "feddyn"):  # parameters get the algorithm's own server update
            for i, (key, _) in enumerate(net.named_parameters()):
                g = global_params[i]
                diffs = torch.stack([_params(loc)[i].detach() - g for loc, _, _ in results])
                if algorithm == "scaffold":
                    sd[key] = g + server_lr * diffs.mean(0)
                    c_server[i] = c_server[i] + len(results) / n * torch.stack([res[2][i] for res in results]).mean(0)
                else:
                    h_server[i] = h_server[i] - alpha / n * diffs.sum(0)
                    sd[key] = g + diffs.mean(0) - h_server[i] / alpha
        net.load_state_dict(sd)
        if on_round is not None:
            on_round(r, net)
        if progress is not None:
            progress.update(1)
    return {"rounds": rounds, "uploaded_bytes": up, "downloaded_bytes": down}
