"""Benchmark: how the main job's cost grows, phase by phase, with sites, image size and images per module.

Runs the embedded pipeline (configs/fashion-silos.toml's network and recipe) at reduced budgets over
three axes, one run per point, each in its own folder (a finished point is skipped on re-run):
  sites        2, 5, 10, 20, 50 sites under dirichlet:0.1
  image size   28, 32, 64 px (Fashion-MNIST resized; 10 silos)
  images       images per module (10 silos, 28 px)
and writes scaling.json, scaling.md (seconds per phase, the dominant phase, accuracy) and scaling.png.
Then it states, as estimates from FLOP counts (torch.utils.flop_counter) and the GFLOP/s the grid
measured per phase, what a 50-site or a 128-px federation at the shipped budgets would take here and
on one GPU at an assumed achieved rate.

    python benchmarks/scaling.py --out runs/scaling
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fedfactory.classify import build_classifier
from fedfactory.config import load_config
from fedfactory.modules.diffusion import denoise, edm_loss
from fedfactory.report import pyplot, save_figure
from fedfactory.runners.embedded import run
from fedfactory.site import new_module
from fedfactory.utils import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # throughput.py, beside this script
from throughput import processor  # noqa: E402
CONFIG = ROOT / "configs" / "fashion-silos.toml"
PHASES = ("data", "modules", "reference", "synthesis", "classifier", "quality")
# Budgets that let the whole grid finish in about 25 minutes on 2 cores; the shipped ones are larger.
# A site's audit still runs and is timed, but does not stop the run: at 50 sites under dirichlet:0.1
# the smallest holds 11 images, and the grid measures cost, not the audit's verdict.
GRID = ["module.budget_images=2000", "classifier.budget_images=20000", "factory.per_class=300",
        "quality.reference_budget=5000", "privacy.enforce=false", "runtime.progress=false"]
GPU_TFLOPS = 100.0  # assumed achieved bf16 rate of one H100 on these small convolutions (an eighth of its peak)


def grid(images_axis: list[int]) -> dict[str, list[str]]:
    """point name -> its overrides on top of GRID; "base" (10 silos, 28 px, GRID's images per module)
    is the first point of both the image-size and the images axis."""
    points = {f"sites-{n}": ["partition.scheme='dirichlet:0.1'", f"partition.clients={n}"] for n in (2, 5, 10, 20, 50)}
    points["base"] = []
    points |= {f"px-{s}": [f"data.size={s}"] for s in (32, 64)}
    points |= {f"images-{b}": [f"module.budget_images={b}"] for b in images_axis}
    return points


def axis(res: dict, prefix: str, key: str) -> list[tuple[int, dict]]:
    """(value, point) along one axis, in grid order: the base point first where it belongs."""
    pts = [] if prefix == "sites" else [(res["points"]["base"][key], res["points"]["base"])]
    return pts + [(int(n.split("-")[1]), p) for n, p in res["points"].items() if n.startswith(prefix + "-")]


def flops_per_image(cfg, size: int) -> dict:
    """GFLOP per image: a module's training step, one sampling call, and a classifier training step."""
    m = new_module(cfg, "probe")
    m.classes, m.image_shape = [0], (size, size, 1)
    net, clf = m.build_network(), build_classifier(1, 10, cfg.classifier.preset, cfg.classifier.width)
    x, y = torch.rand(8, 1, size, size) * 2 - 1, torch.zeros(8, dtype=torch.long)
    counts = {}
    for name, step in (("module_train", lambda: edm_loss(net, x, y, torch.Generator().manual_seed(0)).backward()),
                       ("module_call", lambda: denoise(net, x, torch.ones(8), y)),
                       ("classifier_train", lambda: clf(x).sum().backward())):
        with FlopCounterMode(display=False) as fc:
            step()
        counts[name] = fc.get_total_flops() / 8 / 1e9
    return counts


def module_train(cfg) -> dict:
    """The module's training keys as the sites use them (the config's over the preset's)."""
    return new_module(cfg, "probe").train_cfg


def calls_per_image(cfg) -> int:
    t = module_train(cfg)
    return t["sample_steps"] if t["sampler"] == "dpm2m" else 2 * t["sample_steps"] - 1


def measure(cfg, out: Path) -> dict:
    budget = module_train(cfg)["budget_images"]
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else run(cfg, out)
    t = {k: round(results["timings"].get(k, 0.0), 1) for k in PHASES}
    return {"timings": t, "total": round(sum(t.values()), 1), "dominant": max(t, key=t.get),
            "accuracy": results["metrics"]["accuracy"], "sites": len(results["clients"]),
            "size": cfg.data.size or 28, "module_images": budget,
            "module_images_total": len(results["clients"]) * budget, "calls_per_image": calls_per_image(cfg),
            "synthetic_images": cfg.factory.per_class * 10, "classifier_images": cfg.classifier.budget_images}


def rates(points: dict, fl: dict) -> dict:
    """Achieved GFLOP/s per phase over the 28 px points (both cores, the pipeline's split)."""
    at28 = [p for p in points.values() if p["size"] == 28]
    return {"modules": sum(p["module_images_total"] for p in at28) * fl[28]["module_train"] / sum(p["timings"]["modules"] for p in at28),
            "synthesis": sum(p["synthetic_images"] * p["calls_per_image"] for p in at28) * fl[28]["module_call"] / sum(p["timings"]["synthesis"] for p in at28),
            "classifier": sum(p["classifier_images"] for p in at28) * fl[28]["classifier_train"] / sum(p["timings"]["classifier"] for p in at28)}


def estimates(shipped, fl: dict, here: dict) -> list[dict]:
    """Seconds per phase for federations the grid did not run, at the shipped budgets: here and on one GPU."""
    rows = []
    for name, sites, size in (("50 sites, 28 px", 50, 28), ("10 sites, 128 px", 10, 128), ("50 sites, 128 px", 50, 128)):
        work = {"modules": sites * module_train(shipped)["budget_images"] * fl[size]["module_train"],
                "synthesis": shipped.factory.per_class * 10 * calls_per_image(shipped) * fl[size]["module_call"],
                "classifier": shipped.classifier.budget_images * fl[size]["classifier_train"]}
        rows.append({"federation": name, "GFLOP": {k: round(v) for k, v in work.items()},
                     "here_s": {k: round(v / here[k]) for k, v in work.items()},
                     "gpu_s": {k: round(v / (GPU_TFLOPS * 1e3), 1) for k, v in work.items()}})
    return rows


def table(res: dict) -> str:
    lines = [f"Processor: {res['processor']['model']}, {res['processor']['cpu_count']} cores. Grid: {', '.join(res['grid'])}.", "",
             "| point | sites | px | images/module | " + " | ".join(PHASES) + " | total s | dominant | accuracy |",
             "|---|---|---|---|" + "---|" * (len(PHASES) + 3)]
    for name, p in res["points"].items():
        lines.append(f"| {name} | {p['sites']} | {p['size']} | {p['module_images']:,} | "
                     + " | ".join(f"{p['timings'][k]:.0f}" for k in PHASES)
                     + f" | {p['total']:.0f} | {p['dominant']} | {p['accuracy']:.4f} |")
    lines += ["", f"Achieved GFLOP/s (28 px points): " + ", ".join(f"{k} {v:.0f}" for k, v in res["rates"].items()), "",
              "| estimate (shipped budgets) | modules s | synthesis s | classifier s | total here | total on one GPU |",
              "|---|---|---|---|---|---|"]
    for e in res["estimates"]:
        h, g = e["here_s"], e["gpu_s"]
        lines.append(f"| {e['federation']} | {h['modules']:,} | {h['synthesis']:,} | {h['classifier']:,} | "
                     f"{sum(h.values()) / 60:,.0f} min | {sum(g.values()) / 60:.1f} min (at {GPU_TFLOPS:.0f} TFLOP/s) |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    plt = pyplot()
    axes_of = {"sites": ("sites", "sites (dirichlet:0.1)"), "px": ("size", "image size (px, 10 silos)"),
               "images": ("module_images", "images per module (10 silos)")}
    fig, axs = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    for ax, (prefix, (key, label)) in zip(axs, axes_of.items()):
        pts = axis(res, prefix, key)
        xs = [str(v) for v, _ in pts]
        bottom = [0.0] * len(pts)
        for k in PHASES:
            h = [p["timings"][k] for _, p in pts]
            ax.bar(xs, h, bottom=bottom, label=k)
            bottom = [b + v for b, v in zip(bottom, h)]
        ax.set_xlabel(label)
        ax.set_ylabel("seconds")
        acc = ax.twinx()
        acc.plot(xs, [p["accuracy"] for _, p in pts], "k.-")
        acc.set_ylim(0, 1)
        acc.set_ylabel("accuracy")
    axs[0].legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/scaling")
    ap.add_argument("--images", default="8000", help="images per module on the images axis, beyond the base point's")
    ap.add_argument("--set", action="append", default=[], help="more overrides for every point")
    ap.add_argument("--only", default="", help="comma-separated points to run, in this order (default: all); "
                                               "the table takes every finished point in --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    res = {"processor": processor(), "grid": GRID, "points": {}}
    points = grid([int(v) for v in args.images.split(",")])
    todo = args.only.split(",") if args.only else list(points)
    unknown = sorted(set(todo) - set(points))
    if unknown:
        ap.error(f"unknown point(s) {unknown}; the grid has {', '.join(points)}")
    finished = [n for n in points if n not in todo and (out / n / "results.json").exists()]
    for name in [*todo, *finished]:  # those asked for, in their order; then the table's other finished points
        cfg = load_config(CONFIG, [*GRID, *points[name], *args.set])
        res["points"][name] = measure(cfg, out / name)
        print(name, res["points"][name], flush=True)
    res["points"] = {n: res["points"][n] for n in points if n in res["points"]}  # grid order
    shipped = load_config(CONFIG, args.set)
    fl = {s: flops_per_image(shipped, s) for s in (28, 128)}
    res |= {"GFLOP_per_image": fl, "rates": rates(res["points"], fl), "gpu_assumed_TFLOPs": GPU_TFLOPS}
    res["estimates"] = estimates(shipped, fl, res["rates"])
    atomic_write_json(out / "scaling.json", res)
    atomic_write_text(out / "scaling.md", table(res))
    plot(res, out / "scaling.png")
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
