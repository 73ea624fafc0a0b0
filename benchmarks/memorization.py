"""Benchmark: where memorization starts. One module on a small site, trained far past the CPU
preset's budget, audited (privacy/audit.py) at checkpoints of images seen.

The site: the first `--images` Br35H "tumour" slices at 32 px (the medical set of
configs/br35h-silos.toml), `--holdout` of them held out as the audit set. The network and
learning rate are the CPU preset's; only the budget grows.

    python benchmarks/memorization.py --out runs/bench-memorization [--images 200 --budget 144000]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from fedfactory.config import load_config
from fedfactory.data import load_dataset
from fedfactory.privacy.audit import audit, holdout_split
from fedfactory.runtime import setup_runtime
from fedfactory.site import new_module
from fedfactory.utils import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("copy_rate", "copy_rate_features", "closer_to_train", "train_vs_held_out_p", "mia_auc", "mia_p")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200, help="the site's images (one class)")
    ap.add_argument("--holdout", type=float, default=0.25)
    ap.add_argument("--budget", type=int, default=144_000, help="images seen in all (the CPU preset: 36,000-48,000)")
    ap.add_argument("--every", type=int, default=18_000, help="images seen between audits")
    ap.add_argument("--samples", type=int, default=200, help="generated images per audit")
    ap.add_argument("--out", default="runs/bench-memorization")
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs" / "br35h-silos.toml",
                      [f"module.budget_images={args.budget}", "runtime.threads=2", "runtime.progress=false"])
    setup_runtime(cfg)
    ds = load_dataset("br35h", size=32)
    x, y = ds.x_train[ds.y_train == 1][: args.images], ds.y_train[ds.y_train == 1][: args.images]
    train, held = holdout_split(y, args.holdout, 0, "client-1")
    module = new_module(cfg, "client-1")
    rows, t0 = [], time.perf_counter()

    def checkpoint(seen, ema):
        m = copy.copy(module)
        m.net = copy.deepcopy(ema).eval()
        t = time.perf_counter()
        result, _ = audit(m, x[train], y[train], x[held], y[held], args.samples, 0)
        row = {"images_seen": seen, "passes": round(seen / len(train), 1),
               **{k: round(result[k], 4) for k in KEYS}, "train_seconds": round(t - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    module.fit(x[train], y[train], checkpoint=checkpoint, checkpoint_every=args.every // module.train_cfg["batch_size"])
    out = Path(args.out)
    atomic_write_json(out / "memorization.json", {"site_images": len(train), "held_out": len(held), "rows": rows})
    lines = ["| images seen | passes | copy rate | copy rate (features) | closer to train (p) | MIA AUC (p) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['images_seen']:,} | {r['passes']} | {r['copy_rate']:.3f} | {r['copy_rate_features']:.3f} | "
              f"{r['closer_to_train']:.3f} ({r['train_vs_held_out_p']:.2g}) | {r['mia_auc']:.3f} ({r['mia_p']:.2g}) |"
              for r in rows]
    (out / "memorization.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
