"""Baselines on exactly the factory's partition, classifier and test set.

    centralized   the classifier on the pooled real training data, with the recipe best on real
                  data (the upper bound): classifier.blur, a lever against synthetic artifacts, is
                  replaced by baselines.central_blur (0), at baselines.central_budget images
    centralized-same-recipe   the same, with the factory's classifier recipe and budget unchanged
    local-only    each client's classifier on its own data: alone, and as a Product of Experts
    fedavg, fedprox, scaffold, feddyn   multi-round weight averaging (averaging.py)
    fedcvae-ens, fedcvae-kd   one-shot: per-site conditional VAE decoders, sampled or distilled (fedcvae.py)
    dense, coboosting   one-shot, data-free: the sites' classifiers distilled through a server-trained
                  generator (datafree.py)
    fedov         one-shot: open-set site classifiers with an "unknown" class, voting (fedov.py)

A one-shot peer is a module of this package with `run(method, cfg, ds, part, **kw)` returning
(log-probabilities on the test set, info); info holds rounds, uploaded_bytes, downloaded_bytes and,
optionally, "curves": rows {"series", "step", "loss"} for the run folder's curves.csv.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import ClassifierConfig, Config
from ..classify import build_classifier, predict_log_proba, product_of_experts, train_classifier
from ..classify.augment import augment
from ..classify.train import cross_entropy
from ..data import Dataset, Partition
from ..errors import FedFactoryError
from ..tensors import resolve_device, to_float, use_bf16
from ..utils import derive_seed
from .averaging import ALGORITHMS, FLClient, make_strategy, state_bytes

ONE_SHOT = {"fedcvae-ens": "fedcvae", "fedcvae-kd": "fedcvae", "dense": "datafree", "coboosting": "datafree",
            "fedov": "fedov"}  # method -> the module of this package that runs it
METHODS = ("centralized", "centralized-same-recipe", "local-only", *ALGORITHMS, *ONE_SHOT)


def central_recipe(cfg: Config) -> ClassifierConfig:
    """The centralized bound's classifier: the run's network, with the blur and budget of [baselines]."""
    b = cfg.baselines
    return dataclasses.replace(cfg.classifier, blur=b.central_blur,
                               budget_images=b.central_budget or cfg.classifier.budget_images)


_SITE_CLASSIFIERS: dict[str, tuple[tuple[dict, list], float]] = {}  # this process's, by what made them


def site_classifiers(cfg: Config, ds: Dataset, part: Partition, **kw) -> tuple[dict, list, float]:
    """Each site's classifier trained on its own data with the run's recipe (local-only's experts, and
    the classifiers DENSE and Co-Boosting upload): client id -> network, the curves.csv rows, and the
    seconds of training they reused. Within one process (a `compare`), the same recipe, seed, data and
    partition train them once; later methods get copies, and the first training's seconds (0 when
    they were trained by this call), which compare adds to their wall time."""
    h = hashlib.sha256(repr((cfg.classifier, cfg.seed, ds.name, ds.x_train.shape, sorted(kw.items(), key=str))).encode())
    for cid, idx in part.indices.items():
        h.update(cid.encode() + np.asarray(idx, np.int64).tobytes())
    key = h.hexdigest()
    if key in _SITE_CLASSIFIERS:
        (nets, curves), seconds = _SITE_CLASSIFIERS[key]
        return copy.deepcopy(nets), list(curves), seconds
    t, nets, curves = time.perf_counter(), {}, []
    for cid, idx in part.indices.items():
        nets[cid], stats = train_classifier(ds.x_train[idx], ds.y_train[idx], ds.num_classes, cfg.classifier,
                                            cfg.seed, f"local-{cid}", **kw)
        curves += [{"series": f"site/{cid}", **p} for p in stats["curve"]]
    _SITE_CLASSIFIERS[key] = ((nets, curves), time.perf_counter() - t)  # a compare's seeds: a few small networks each
    return copy.deepcopy(nets), list(curves), 0.0


def run_baseline(method: str, cfg: Config, ds: Dataset, part: Partition) -> tuple[np.ndarray, dict]:
    """Train `method` and return log-probabilities on the real test set and what it cost."""
    c, seed, progress = cfg.classifier, cfg.seed, cfg.runtime.progress
    device = resolve_device(cfg.runtime.device)
    bf16 = use_bf16(device, cfg.runtime.bf16)
    policy = ds.augment if c.augment == "auto" else c.augment
    kw = dict(augment_policy=policy, device=device, bf16=bf16, progress=progress)
    if method in ("centralized", "centralized-same-recipe"):
        idx = np.sort(np.concatenate(list(part.indices.values())))
        recipe = central_recipe(cfg) if method == "centralized" else c
        net, stats = train_classifier(ds.x_train[idx], ds.y_train[idx], ds.num_classes, recipe, seed, method, **kw)
        curves = [{"series": f"classifier/{method}", **p} for p in stats.pop("curve")]
        return predict_log_proba(net, ds.x_test, device, bf16), {"rounds": 0, "uploaded_bytes": 0, "downloaded_bytes": 0,
                                                                  "classifier": stats, "curves": curves}
    if method == "local-only":
        nets, curves, seconds = site_classifiers(cfg, ds, part, **kw)
        experts = {cid: predict_log_proba(net, ds.x_test, device, bf16) for cid, net in nets.items()}
        alone = {cid: float((lp.argmax(1) == ds.y_test).mean()) for cid, lp in experts.items()}
        # one-shot sharing of classifiers: each uploads its classifier once, the PoE is the ensemble
        return product_of_experts(list(experts.values())), {
            "rounds": 1, "uploaded_bytes": sum(map(state_bytes, nets.values())), "downloaded_bytes": 0,
            "accuracy_alone": alone, "curves": curves, "accuracy_alone_mean": float(np.mean(list(alone.values()))),
            "reused_site_training_seconds": round(seconds, 2)}
    if method in ONE_SHOT:
        return importlib.import_module(f".{ONE_SHOT[method]}", __name__).run(method, cfg, ds, part, **kw)
    if method in ALGORITHMS:
        return _weight_averaging(method, cfg, ds, part, device, bf16, policy)
    raise FedFactoryError(f"unknown method {method!r}; use factory or one of {', '.join(METHODS)}")


def _weight_averaging(method, cfg, ds, part, device, bf16, policy):
    c, b, seed = cfg.classifier, cfg.baselines, cfg.seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "classifier", method, "init"))
        net = build_classifier(ds.image_shape[-1], ds.num_classes, c.preset, c.width).to(device)
    gen = torch.Generator(device).manual_seed(derive_seed(seed, method, "augment"))

    def client(cid, idx):
        x_all, y_all = to_float(ds.x_train[idx]).to(device), torch.from_numpy(ds.y_train[idx]).to(device)

        def batches(r):
            for e in range(b.local_epochs):
                order = np.random.default_rng(derive_seed(seed, method, cid, r, e)).permutation(len(idx))
                for i in range(0, len(order), c.batch_size):
                    sel = torch.from_numpy(order[i : i + c.batch_size]).to(device)
                    yield augment(x_all[sel], policy, gen, c.blur), y_all[sel]
        return FLClient(cid, len(idx), batches)

    losses, seen, points = [], [0], []  # the round's local losses (on the device), images seen, (round, seen, mean)

    def loss_fn(model, x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = cross_entropy(model(x), y)
        losses.append(loss.detach().double())
        seen[0] += len(x)
        return loss

    curve = []

    def on_round(r, model):
        if losses:
            points.append((r + 1, seen[0], torch.stack(losses).mean()))
            losses.clear()
        if (r + 1) % b.eval_every == 0 or r + 1 == b.rounds:
            lp = predict_log_proba(model, ds.x_test, device, bf16)
            curve.append({"round": r + 1, "accuracy": float((lp.argmax(1) == ds.y_test).mean())})
            bar.set_postfix(acc=f"{curve[-1]['accuracy']:.3f}")
        bar.update(1)

    clients = [client(cid, idx) for cid, idx in part.indices.items()]
    with tqdm(total=b.rounds, desc=method, unit="round", disable=None if cfg.runtime.progress else True, leave=False) as bar:
        strategy = make_strategy(method, lr=b.lr, fraction=b.fraction, weight_decay=c.weight_decay,
                                 mu=b.mu, alpha=b.alpha)
        info = strategy.fit(net, clients, loss_fn, b.rounds, seed, on_round=on_round)
    info["learning_curve"] = curve
    # the clients' training loss, each round's mean over its local steps: read from the device once
    values = torch.stack([v for _, _, v in points]).tolist() if points else []
    info["curves"] = [{"series": f"{method}/rounds", "step": r, "images_seen": n, "loss": v}
                      for (r, n, _), v in zip(points, values)]
    return predict_log_proba(net, ds.x_test, device, bf16), info
