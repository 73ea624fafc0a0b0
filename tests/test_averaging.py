"""Each weight-averaging algorithm on a tiny problem whose outcome its paper predicts.

Two clients with 1-D quadratic losses f_k(w) = a_k/2 (w - b_k)^2 and different curvatures: the
optimum of the average loss is w* = sum(a_k b_k) / sum(a_k). With many local steps FedAvg drifts
to a biased fixed point (client drift); SCAFFOLD and FedDyn converge to w* (their papers' claim);
FedProx with a huge mu barely moves from the global model.
"""

import pytest
import torch

from fedfactory.baselines.averaging import SCAFFOLD, FedAvg, FedDyn, FedProx, FLClient, make_strategy

A, B = (1.0, 4.0), (3.0, -1.0)
W_STAR = sum(a * b for a, b in zip(A, B)) / sum(A)  # -0.2


def quad_clients(local_steps):
    def batches_for(a, b):
        return lambda r: [(torch.tensor(a), torch.tensor(b))] * local_steps
    return [FLClient(f"c{k}", 1, batches_for(a, b)) for k, (a, b) in enumerate(zip(A, B))]


def loss_fn(net, a, b):
    return a / 2 * (net.weight.squeeze() - b) ** 2


def train(strategy, rounds=300, local_steps=10):
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    stats = strategy.fit(net, quad_clients(local_steps), loss_fn, rounds, seed=0)
    return net.weight.item(), stats


def test_fedavg_one_local_step_is_centralized_gradient_descent():
    # one local step each, equal weights: the average of the local steps is one GD step on mean(f_k)
    w, _ = train(FedAvg(lr=0.1), rounds=1, local_steps=1)
    grad = sum(a * (0.0 - b) for a, b in zip(A, B)) / 2
    assert w == pytest.approx(-0.1 * grad, abs=1e-6)


def test_fedavg_drifts_with_many_local_steps():
    w, stats = train(FedAvg())
    assert abs(w - W_STAR) > 0.3  # converges, but to the biased fixed point
    assert stats["rounds"] == 300 and stats["uploaded_bytes"] == 300 * 2 * 4


def test_scaffold_corrects_client_drift():
    w, stats = train(SCAFFOLD())
    assert w == pytest.approx(W_STAR, abs=1e-3)
    assert stats["uploaded_bytes"] == 300 * 2 * 8  # model + control-variate update


def test_feddyn_reaches_the_global_optimum():
    w, _ = train(FedDyn(alpha=0.1))
    assert w == pytest.approx(W_STAR, abs=1e-3)


def test_fedprox_mu_limits_local_drift():
    free, _ = train(FedProx(mu=0.0), rounds=1)
    fedavg, _ = train(FedAvg(), rounds=1)
    tight, _ = train(FedProx(lr=1e-5, mu=1e4), rounds=1)
    assert free == pytest.approx(fedavg)
    assert abs(tight) < 1e-3 < abs(free)


def test_make_strategy_takes_each_algorithm_its_own_parameters():
    config = dict(lr=0.1, fraction=0.5, weight_decay=0.0, mu=0.3, alpha=0.2)
    assert make_strategy("fedprox", **config) == FedProx(lr=0.1, fraction=0.5, mu=0.3)
    assert make_strategy("feddyn", **config) == FedDyn(lr=0.1, fraction=0.5, alpha=0.2)
    assert make_strategy("scaffold", lr=0.1) == SCAFFOLD(lr=0.1, server_lr=1.0)


def test_bad_algorithm_and_fraction():
    from fedfactory.errors import FedFactoryError

    with pytest.raises(FedFactoryError, match="unknown averaging"):
        make_strategy("fedsgd")
    with pytest.raises(FedFactoryError, match="fraction"):
        train(FedAvg(fraction=0))
