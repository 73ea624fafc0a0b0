"""Fuzzing the readers of untrusted input, the long run: seeded cases for minutes, a table per target.

The generators (one target per reader) live in tests/fuzzing.py, which tests/test_fuzz.py drives
with hypothesis in CI; this script runs the same targets for longer and keeps each failure's
replay key.

    python benchmarks/fuzz.py --seconds 300               # equal time per target
    python benchmarks/fuzz.py --examples 20000            # cases in all, split over the targets
    python benchmarks/fuzz.py --targets npz,idx --seconds 60 --out runs/fuzz.json
    python benchmarks/fuzz.py --replay npz:0:123          # rerun one case (target:seed:index), with its traceback
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import resource
import sys
import time
import traceback
import warnings
from pathlib import Path

TESTS = str(Path(__file__).resolve().parents[1] / "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from fuzzing import TARGETS, run_case, valid_module  # noqa: E402  (tests/fuzzing.py, on the path above)


def case_rng(target: str, seed: int, index: int) -> random.Random:
    return random.Random(f"{target}:{seed}:{index}")


def run_target(name: str, seed: int, max_cases: int | None, seconds: float | None, keep: int = 5) -> dict:
    stats = {"target": name, "cases": 0, "refused": 0, "accepted": 0, "other": 0, "max_case_s": 0.0,
             "errors": {}, "failures": []}
    t_end = time.perf_counter() + seconds if seconds else None
    i = 0
    while (max_cases is None or i < max_cases) and (t_end is None or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        try:
            stats[run_case(TARGETS[name], case_rng(name, seed, i))] += 1
        except Exception as e:  # noqa: BLE001 -- counting what escapes is the point of this script
            stats["other"] += 1
            kind = f"{type(e).__name__}: {str(e)[:120]}"
            stats["errors"][kind] = stats["errors"].get(kind, 0) + 1
            if len(stats["failures"]) < keep:
                stats["failures"].append({"replay": f"{name}:{seed}:{i}", "error": kind,
                                          "traceback": traceback.format_exc(limit=-6)})
        stats["max_case_s"] = max(stats["max_case_s"], round(time.perf_counter() - t0, 3))
        stats["cases"] += 1
        i += 1
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=None, help="cases in all, split evenly over the targets")
    ap.add_argument("--seconds", type=float, default=None, help="wall-time budget, split evenly over the targets")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, from {', '.join(TARGETS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/fuzz.json", help="where the JSON results go")
    ap.add_argument("--replay", default="", help="target:seed:index: rerun one case and show its traceback")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")  # Pillow's and numpy's complaints about the inputs are expected
    import flwr.app  # noqa: F401  (configures its logger on import: quieten it after)

    logging.getLogger("flwr").setLevel(logging.ERROR)
    if args.replay:
        name, seed, index = args.replay.split(":")
        print(run_case(TARGETS[name], case_rng(name, int(seed), int(index))))
        return 0
    names = [t for t in args.targets.split(",") if t]
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}")
    if args.examples is None and args.seconds is None:
        args.seconds = 60.0
    per_cases = max(1, args.examples // len(names)) if args.examples else None
    per_seconds = args.seconds / len(names) if args.seconds else None
    valid_module()  # train the seed module before the clock starts
    t0, results = time.perf_counter(), []
    for name in names:
        results.append(run_target(name, args.seed, per_cases, per_seconds))
        r = results[-1]
        print(f"  {name}: {r['cases']} cases, {r['other']} other exceptions", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0

    head = f"{'target':<16} {'cases':>7} {'clear errors':>13} {'accepted':>9} {'other exceptions':>17} {'max case s':>11}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['target']:<16} {r['cases']:>7} {r['refused']:>13} {r['accepted']:>9} {r['other']:>17} {r['max_case_s']:>11.2f}")
    total = {k: sum(r[k] for r in results) for k in ("cases", "refused", "accepted", "other")}
    print(f"{'total':<16} {total['cases']:>7} {total['refused']:>13} {total['accepted']:>9} {total['other']:>17}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wall {wall:.0f} s, peak RSS {peak_mib:.0f} MiB, seed {args.seed}")
    for r in results:
        for f in r["failures"]:
            print(f"\n{r['target']} {f['error']}  (replay: python benchmarks/fuzz.py --replay {f['replay']})\n{f['traceback']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seed": args.seed, "wall_s": round(wall, 1), "peak_rss_mib": round(peak_mib),
                               "totals": total,
                               "targets": results}, indent=2))
    print(f"results: {out}")
    return 1 if total["other"] else 0


if __name__ == "__main__":
    sys.exit(main())
