"""Benchmark: one site's DP module under several (expected batch, learning rate) settings (issue 14).

A full DP run of the Fashion-MNIST silos takes over an hour of this CPU, so the DP recipe is tuned
on one site first. Each variant trains that site's module with DP-SGD at the config's epsilon
(same images, same budget, same holdout as `fedfactory run`), samples it with the run's sampler,
and measures its samples in the features of a classifier trained on the real training data:

- recognized: the share of samples that this real-data classifier assigns to the site's class
  (how often the module draws its class at all: a collapsed class is drawn as its neighbours);
- fid, precision, recall, density, coverage against the real test images of that class (quality.py).

    python benchmarks/dp_batch_probe.py configs/fashion-silos.toml --client client-6 \\
        --set privacy.epsilon=10 --variant 64:0.002 --variant 256:0.004

Variants run one after another, each with the runtime's threads. `--module DIR` measures an
already trained module instead (e.g. a finished run's) as one more row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from fedfactory.classify import predict_log_proba
from fedfactory.config import load_config
from fedfactory.modules import load_module
from fedfactory.quality import compare, features, train_reference
from fedfactory.runners.embedded import prepare_data, site_data
from fedfactory.runtime import classifier_kw, setup_runtime
from fedfactory.server import evaluation_split
from fedfactory.site import train_module
from fedfactory.utils import atomic_write_json


def parse_variant(text: str) -> tuple[int, float]:
    try:
        batch, lr = text.split(":")
        return int(batch), float(lr)
    except ValueError:
        sys.exit(f"--variant {text!r}: expected BATCH:LR, e.g. 256:0.004")


def measure(module, cls: int, n: int, reference, real, kw: dict, seed: int) -> dict:
    """A module's n samples of class cls against `real`, the reference's features of the real test images."""
    images = module.sample(cls, n, seed)
    recognized = float((predict_log_proba(reference, images, kw["device"], kw["bf16"]).argmax(1) == cls).mean())
    return {"recognized": round(recognized, 4),
            **compare(real, features(reference, images, kw["device"], kw["bf16"]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--client", required=True, help="the site whose module is probed, e.g. client-6")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--variant", action="append", type=parse_variant, default=[], help="BATCH:LR (repeatable)")
    ap.add_argument("--module", action="append", default=[], help="a trained module folder to measure as well")
    ap.add_argument("--samples", type=int, default=1000, help="samples measured per module")
    ap.add_argument("--out", default="runs/dp_batch_probe.json")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    setup_runtime(cfg)
    ds, part = prepare_data(cfg)
    test = evaluation_split(cfg, ds)
    kw = classifier_kw(cfg, test.augment)
    x, y = site_data(ds, part, args.client)
    classes = np.unique(y)
    if len(classes) != 1:
        sys.exit(f"{args.client} holds {len(classes)} classes; the probe measures a one-class site")
    cls = int(classes[0])
    t = time.perf_counter()
    reference, _ = train_reference(cfg, ds.x_train, ds.y_train, test.num_classes, kw)
    print(f"reference classifier: {time.perf_counter() - t:.0f} s", flush=True)
    real = features(reference, test.images[test.labels == cls], kw["device"], kw["bf16"])  # once for every row
    rows = []
    for path in args.module:
        m = load_module(path, device=cfg.runtime.device, bf16=cfg.runtime.bf16)
        rows.append({"module": path, "dp": m.privacy.get("dp"),
                     **measure(m, cls, args.samples, reference, real, kw, cfg.seed)})
        print(json.dumps(rows[-1]), flush=True)
    for batch, lr in args.variant:
        vcfg = cfg.replace({"module.batch_size": batch, "module.lr": lr})
        t = time.perf_counter()
        m = train_module(vcfg, args.client, x, y)
        seconds = time.perf_counter() - t
        dp = m.privacy.get("dp") or {}
        rows.append({"batch": batch, "lr": lr, "train_seconds": round(seconds, 1),
                     "noise_multiplier": dp.get("noise_multiplier"), "epsilon": dp.get("epsilon"), "steps": dp.get("steps"),
                     **measure(m, cls, args.samples, reference, real, kw, cfg.seed)})
        print(json.dumps(rows[-1]), flush=True)
    atomic_write_json(Path(args.out), {"config": args.config, "client": args.client, "class": cls,
                                       "set": args.set, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
