"""Benchmark: the classifier's recipe on a finished run's synthetic set (issue 15).

Takes the synthetic images a run kept (RUN/synthetic, verified by hash; a run that kept none has them
sampled again, which gives the same images) and, for each variant, trains the run's classifier with the variant's
settings over the run's own, then evaluates it on the test set. `base` is the run's own recipe: it
must reproduce the run's accuracy bit for bit (a check that the harness is faithful).

    python benchmarks/classifier_levers.py --run runs/fashion-dpm2m --variant base \\
        --variant label_smoothing=0.1 --variant ema_halflife_images=20000 --variant mixup=0.2,label_smoothing=0.1
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
from fedfactory.runners.embedded import prepare_data
from fedfactory.runtime import classifier_kw, setup_runtime
from fedfactory.server import evaluation_split, synthesize_all
from fedfactory.utils import atomic_write_json


def parse_variant(text: str) -> list[str]:
    """'base' or KEY=VALUE[,KEY=VALUE...] over classifier.*, as --set overrides."""
    if text == "base":
        return []
    pairs = [p for p in text.split(",") if p]
    if not pairs or any("=" not in p for p in pairs):
        sys.exit(f"--variant {text!r}: expected 'base' or KEY=VALUE[,KEY=VALUE...], e.g. label_smoothing=0.1")
    return [f"classifier.{p}" for p in pairs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished run folder (its config.toml, modules/ and synthetic/)")
    ap.add_argument("--variant", action="append", type=parse_variant, required=True,
                    help="'base' or KEY=VALUE[,KEY=VALUE...] of classifier settings (repeatable)")
    ap.add_argument("--out", help="where to write the JSON (default RUN/classifier_levers.json)")
    args = ap.parse_args(argv)
    run_dir = Path(args.run)
    cfg = load_config(run_dir / "config.toml", [])
    kept = (run_dir / "synthetic").is_dir()
    if not kept:  # an older run: its set is sampled again (deterministic, so the same), and not stored there
        print(f"{run_dir} kept no synthetic set: sampling it again", file=sys.stderr)
        cfg = cfg.replace({"factory.keep_shards": False})
    setup_runtime(cfg)
    ds, _ = prepare_data(cfg)
    test = evaluation_split(cfg, ds)
    modules = sorted((load_module(p, device=cfg.runtime.device, bf16=cfg.runtime.bf16)
                      for p in sorted((run_dir / "modules").iterdir()) if p.is_dir()), key=lambda m: m.client_id)
    synth = synthesize_all(cfg, modules, test.num_classes, test.class_names, run_dir if kept else None)
    rows = []
    for overrides in args.variant:
        vcfg = load_config(run_dir / "config.toml", overrides)
        setup_runtime(vcfg)
        kw = classifier_kw(vcfg, test.augment)
        t = time.perf_counter()
        net, stats = train_classifier(synth.images, synth.labels, test.num_classes, vcfg.classifier, vcfg.seed,
                                      "server", **kw)
        m = evaluate(test.labels, predict_log_proba(net, test.images, kw["device"], kw["bf16"]), test.num_classes)
        row = {"variant": ",".join(overrides) or "base", "accuracy": m["accuracy"],
               "balanced_accuracy": m["balanced_accuracy"], "auroc": m["auroc"],
               "per_class_accuracy": [round(a, 3) for a in m["per_class_accuracy"]],
               "classifier_seconds": round(time.perf_counter() - t, 1), "final_loss": stats["final_loss"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    atomic_write_json(Path(args.out or run_dir / "classifier_levers.json"),
                      {"run": str(run_dir), "synthetic_sha256": synth.digest(), "variants": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
