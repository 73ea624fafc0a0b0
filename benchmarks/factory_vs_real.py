"""Benchmark: a factory run (default: the main job, Fashion-MNIST silos) against real-data classifiers.

Runs a config (default configs/fashion-silos.toml: 10 clients with one class each, so one
diffusion module per class), then trains the same classifier network on
  (b) an equally sized real set (as many real images per class as synthetic ones; when the
      classifier blurs its inputs, also without the blur, the stricter reference), and
  (c) the whole real training set (centralized, the upper bound), with the recipe best on real
      data (`baselines.central_blur`, no blur) at the factory's budget and at each budget of
      --central-budgets (a stated large budget: trained to convergence), and with the factory's
      own recipe (the same-recipe column),
and prints every accuracy, the ratio against the strongest bound and against the same recipe, and
throughput. It runs server mode, whatever the config's classifier.mode.

    python benchmarks/factory_vs_real.py --out runs/bench-fashion [--set module.budget_images=36000]
    python benchmarks/factory_vs_real.py --config configs/br35h-silos.toml --out runs/bench-br35h
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from fedfactory.baselines import central_recipe
from fedfactory.classify import predict_log_proba, train_classifier
from fedfactory.config import load_config
from fedfactory.evaluate import evaluate
from fedfactory.tensors import resolve_device, use_bf16
from fedfactory.runners.embedded import prepare_data, run
from fedfactory.utils import atomic_write_json, derive_seed

ROOT = Path(__file__).resolve().parents[1]


def real_baseline(cfg, ds, idx, name, recipe=None):
    device = resolve_device(cfg.runtime.device)
    bf16 = use_bf16(device, cfg.runtime.bf16)
    t = time.perf_counter()
    net, _ = train_classifier(ds.x_train[idx], ds.y_train[idx], ds.num_classes, recipe or cfg.classifier, cfg.seed, name,
                              augment_policy=ds.augment, device=device, bf16=bf16, progress=cfg.runtime.progress)
    m = evaluate(ds.y_test, predict_log_proba(net, ds.x_test, device, bf16), ds.num_classes)
    m["wall_seconds"] = round(time.perf_counter() - t, 1)
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "fashion-silos.toml"))
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default="runs/bench-fashion-silos")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--central-budgets", default="600000",
                    help="comma-separated budgets (images) of the centralized bound beyond the factory's (0: none)")
    args = ap.parse_args()
    # Server mode whatever the config says: the benchmark weighs a classifier on the synthetic set alone.
    cfg = load_config(args.config, ["classifier.mode=server", *args.set])
    if cfg.classifier.mode != "server":
        sys.exit("factory_vs_real.py measures server mode (a classifier on the synthetic set only); "
                 "compare local mode with `fedfactory compare --methods factory,centralized`")

    t0 = time.perf_counter()
    res = run(cfg, args.out, resume=args.resume)
    pipeline = time.perf_counter() - t0
    ds, part = prepare_data(cfg)
    per_class = cfg.factory.per_class
    rng = np.random.default_rng(derive_seed(cfg.seed, "benchmark", "real-subset"))
    equal = np.sort(np.concatenate([rng.choice(np.flatnonzero(ds.y_train == c), per_class, replace=False)
                                    for c in range(ds.num_classes)]))
    real_equal = real_baseline(cfg, ds, equal, "real-equal")
    # Blur (classifier.blur) is there against generator artifacts and costs real data accuracy:
    # also measure the equal real set without it, the stricter reference for the ratio.
    sharp = cfg.replace({"classifier.blur": 0.0})
    real_sharp = real_baseline(sharp, ds, equal, "real-equal-sharp") if cfg.classifier.blur > 0 else real_equal
    everything = np.arange(len(ds.y_train))
    same_recipe = real_baseline(cfg, ds, everything, "centralized-same-recipe")
    budgets = [cfg.classifier.budget_images] + [int(b) for b in args.central_budgets.split(",") if int(b)]
    bounds = {b: real_baseline(cfg, ds, everything, f"centralized-{b}",
                               central_recipe(cfg.replace({"baselines.central_budget": b}))) for b in budgets}
    strongest = max(bounds, key=lambda b: bounds[b]["accuracy"])
    central = bounds[cfg.classifier.budget_images]

    stats = [m["train_stats"] for m in res["modules"]]
    synth_n = res["synthetic"]["images"]
    out = {
        "config": args.config, "overrides": args.set,
        "server_accuracy": res["metrics"]["accuracy"], "server_auroc": res["metrics"]["auroc"],
        "server_balanced_accuracy": res["metrics"]["balanced_accuracy"],
        "real_equal_accuracy": real_equal["accuracy"], "centralized_accuracy": central["accuracy"],
        "centralized_auroc": central["auroc"], "centralized_balanced_accuracy": central["balanced_accuracy"],
        "ratio_synthetic_over_real_equal": res["metrics"]["accuracy"] / real_equal["accuracy"],
        "real_equal_blur_free_accuracy": real_sharp["accuracy"],
        "ratio_synthetic_over_real_equal_blur_free": res["metrics"]["accuracy"] / real_sharp["accuracy"],
        "ratio_server_over_centralized": res["metrics"]["accuracy"] / central["accuracy"],
        "centralized_by_budget": {str(b): m["accuracy"] for b, m in bounds.items()},
        "strongest_bound": {"budget_images": strongest, "accuracy": bounds[strongest]["accuracy"],
                            "blur": cfg.baselines.central_blur},
        "ratio_server_over_strongest_bound": res["metrics"]["accuracy"] / bounds[strongest]["accuracy"],
        "centralized_same_recipe_accuracy": same_recipe["accuracy"],
        "ratio_server_over_same_recipe": res["metrics"]["accuracy"] / same_recipe["accuracy"],
        "modules_wall_seconds": res["timings"]["modules"],
        "module_train_images_per_s_each": round(float(np.mean([s["train_images_per_s"] for s in stats])), 1),
        "module_train_images_per_s_total": round(sum(s["images_seen"] for s in stats) / res["timings"]["modules"], 1),
        "sampling_images_per_s": round(synth_n / res["timings"]["synthesis"], 1),
        "pipeline_seconds": round(pipeline, 1), "timings": res["timings"],
        "baseline_seconds": {"real_equal": real_equal["wall_seconds"], "real_equal_blur_free": real_sharp["wall_seconds"],
                             "centralized_same_recipe": same_recipe["wall_seconds"],
                             **{f"centralized_{b}": m["wall_seconds"] for b, m in bounds.items()}},
    }
    atomic_write_json(Path(args.out) / "benchmark.json", out)
    print(json.dumps(out, indent=2))
    print(f"samples: {Path(args.out) / 'samples.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
