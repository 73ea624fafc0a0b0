"""Benchmark: the factory's synthesis levers on a finished run's modules (issue 15).

Takes the modules of a run (nothing is trained again) and, for each variant SAMPLER:STEPS:PER_CLASS
(optionally :SIGMA_MIN, where the sampler stops; the run's own otherwise),
synthesizes the class-balanced set, trains the run's classifier on it (same config, same seed, same
budget) and evaluates it on the test set. So the sampler and the number of synthetic images can be
weighed against the minutes they cost, on the same modules.

    python benchmarks/synthesis_levers.py --run runs/fashion-audit \
        --variant heun:10:1000 --variant dpm2m:10:1000 --variant dpm2m:10:2000

heun:10 makes 19 network calls per image, dpm2m:10 makes 10. The first variant should be the run's own
settings: it must reproduce the run's accuracy bit for bit (a check that the harness is faithful).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedfactory.classify import predict_log_proba, train_classifier
from fedfactory.config import load_config
from fedfactory.evaluate import evaluate
from fedfactory.modules import load_module
from fedfactory.modules.diffusion import SAMPLERS
from fedfactory.runners.embedded import prepare_data
from fedfactory.runtime import classifier_kw, setup_runtime
from fedfactory.server import evaluation_split, synthesize_all
from fedfactory.utils import atomic_write_json


def parse_variant(text: str) -> tuple[str, int, int, float | None]:
    try:
        sampler, steps, per_class, *sigma_min = text.split(":")
        if sampler not in SAMPLERS or len(sigma_min) > 1:
            raise ValueError
        return sampler, int(steps), int(per_class), float(sigma_min[0]) if sigma_min else None
    except ValueError:
        sys.exit(f"--variant {text!r}: expected SAMPLER:STEPS:PER_CLASS[:SIGMA_MIN] with SAMPLER one of "
                 f"{sorted(SAMPLERS)}, e.g. dpm2m:10:2000 or dpm2m:10:1000:0.1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished run folder (its config.toml and modules/)")
    ap.add_argument("--variant", action="append", type=parse_variant, required=True,
                    help="SAMPLER:STEPS:PER_CLASS[:SIGMA_MIN], e.g. heun:10:1000 (repeatable)")
    ap.add_argument("--out", help="where to write the JSON (default RUN/synthesis_levers.json)")
    args = ap.parse_args(argv)
    run_dir = Path(args.run)
    # every variant samples afresh: its synthesis time is the figure
    cfg = load_config(run_dir / "config.toml", ["factory.keep_shards=false"])
    setup_runtime(cfg)
    ds, _ = prepare_data(cfg)
    test = evaluation_split(cfg, ds)
    kw = classifier_kw(cfg, test.augment)
    modules = sorted((load_module(p, device=cfg.runtime.device, bf16=cfg.runtime.bf16)
                      for p in sorted((run_dir / "modules").iterdir()) if p.is_dir()), key=lambda m: m.client_id)
    rows = []
    own_sigma_min = {m.client_id: m.train_cfg["sigma_min"] for m in modules}
    for sampler, steps, per_class, sigma_min in args.variant:
        for m in modules:
            m.train_cfg.update(sampler=sampler, sample_steps=steps,
                               sigma_min=own_sigma_min[m.client_id] if sigma_min is None else sigma_min)
        vcfg = cfg.replace({"factory.per_class": per_class})
        t = time.perf_counter()
        synth = synthesize_all(vcfg, modules, test.num_classes, test.class_names)
        synthesis = time.perf_counter() - t
        t = time.perf_counter()
        net, _ = train_classifier(synth.images, synth.labels, test.num_classes, vcfg.classifier, vcfg.seed,
                                  "server", **kw)
        classifier = time.perf_counter() - t
        m = evaluate(test.labels, predict_log_proba(net, test.images, kw["device"], kw["bf16"]), test.num_classes)
        row = {"sampler": sampler, "steps": steps, "per_class": per_class,
               "sigma_min": modules[0].train_cfg["sigma_min"], "accuracy": m["accuracy"],
               "balanced_accuracy": m["balanced_accuracy"], "auroc": m["auroc"], "per_class_accuracy": m["per_class_accuracy"],
               "synthesis_seconds": round(synthesis, 1), "classifier_seconds": round(classifier, 1),
               "synthetic_images": len(synth.labels), "synthetic_sha256": synth.digest()}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_class_accuracy"}), flush=True)
    atomic_write_json(Path(args.out or run_dir / "synthesis_levers.json"), {"run": str(run_dir), "variants": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
