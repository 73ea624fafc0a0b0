"""`fedfactory compare`: every method x every seed on the same partition, side by side.

Each (method, seed) pair gets its own folder with a results.json; finished pairs are skipped on
re-run. The factory runs through the embedded runner; baselines through baselines/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..config import Config
from ..baselines import METHODS, run_baseline
from ..errors import FedFactoryError
from ..evaluate import evaluate
from ..report import CURVES, METRICS, pyplot, save_figure, write_curves
from ..utils import atomic_write_json, atomic_write_text
from ..runtime import setup_runtime
from .common import prepare_data
from .embedded import run

ALL_METHODS = ("factory", *METHODS)
TABLE = ("accuracy", "balanced_accuracy", "auroc", "f1")


def run_method(method: str, cfg: Config, out: Path) -> dict:
    if method == "factory":
        return run(cfg, out, resume=(out / "config.toml").exists())
    setup_runtime(cfg)
    t = time.perf_counter()
    ds, part = prepare_data(cfg)
    log_proba, info = run_baseline(method, cfg, ds, part)
    wall = time.perf_counter() - t
    out.mkdir(parents=True, exist_ok=True)
    write_curves(out / CURVES, info.pop("curves", []))  # the training curves, beside results.json, not in it
    timings = {"total": round(wall, 2)}
    if info.get("reused_site_training_seconds"):  # the sites' classifiers another method trained: their cost counts here too
        timings["reused_site_training"] = info.pop("reused_site_training_seconds")
    results = {"library_version": __version__, "method": method, "config": cfg.to_dict(),
               "metrics": evaluate(ds.y_test, log_proba, ds.num_classes), "timings": timings,
               "clients": part.counts, "communication": {k: info.pop(k) for k in ("rounds", "uploaded_bytes", "downloaded_bytes")},
               "details": info}
    atomic_write_json(out / "results.json", results)
    return results


def _summary(runs: list[dict]) -> dict:
    out = {}
    for k in METRICS:
        vals = [r["metrics"][k] for r in runs]
        out[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "runs": vals}
    comm = [r.get("communication", {}) for r in runs]
    out["rounds"] = comm[0].get("rounds", 1)
    out["uploaded_bytes"] = int(np.mean([c.get("uploaded_bytes", 0) for c in comm]))
    out["downloaded_bytes"] = int(np.mean([c.get("downloaded_bytes", 0) for c in comm]))
    out["wall_seconds"] = float(np.mean([sum(r["timings"].values()) for r in runs]))
    curves = [r.get("details", {}).get("learning_curve") for r in runs]
    if all(curves):  # test accuracy after each evaluated round, mean over seeds
        out["learning_curve"] = [{"round": pts[0]["round"], "accuracy": float(np.mean([p["accuracy"] for p in pts]))}
                                 for pts in zip(*curves)]
    return out


def compare(cfg: Config, methods: list[str], seeds: list[int], out: str | Path) -> dict:
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        raise FedFactoryError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    if not seeds:
        raise FedFactoryError("--seeds needs at least one seed")
    out = Path(out)
    summary = {"config": cfg.to_dict(), "seeds": seeds, "methods": {}}
    for method in methods:
        runs = []
        for seed in seeds:
            d = out / method / f"seed-{seed}"
            if (d / "results.json").exists():
                runs.append(json.loads((d / "results.json").read_text()))
                continue
            runs.append(run_method(method, cfg.replace({"seed": seed}), d))
        summary["methods"][method] = _summary(runs)
    atomic_write_json(out / "comparison.json", summary)
    _write_markdown(out, summary)
    _write_latex(out, summary)
    _bar_chart(out, summary)
    _learning_curves(out, summary)
    return summary


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.0f} PB"


def _write_markdown(out: Path, s: dict) -> None:
    cfg = s["config"]
    lines = [f"# Comparison: {cfg['data']['name']}, {cfg['partition']['scheme']}, {cfg['partition']['clients']} clients",
             "", f"Seeds {s['seeds']}; mean +- std over seeds; metrics on the real test set.", "",
             "| method | " + " | ".join(TABLE) + " | rounds | uploaded | downloaded | wall s |",
             "|---|" + "---|" * (len(TABLE) + 4)]
    for name, m in s["methods"].items():
        cells = [f"{m[k]['mean']:.4f} +- {m[k]['std']:.4f}" for k in TABLE]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {m['rounds']} | {_fmt_bytes(m['uploaded_bytes'])} | {_fmt_bytes(m['downloaded_bytes'])} | {m['wall_seconds']:.0f} |")
    lines += ["", "![accuracy by method](comparison.png)", ""]
    if any("learning_curve" in m for m in s["methods"].values()):
        lines += ["![test accuracy by round](learning_curves.png)", ""]
    atomic_write_text(out / "comparison.md", "\n".join(lines))


LATEX_SPECIAL = {**{c: "\\" + c for c in "&%$#_{}"}, "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "\\": r"\textbackslash{}"}


def _write_latex(out: Path, s: dict) -> None:
    r"""comparison.tex: the table as a booktabs tabular (\usepackage{booktabs}), mean $\pm$ std over the
    seeds, the best mean of each metric (at the printed precision) in bold."""
    cfg, methods = s["config"], s["methods"]
    best = {k: max(round(m[k]["mean"], 4) for m in methods.values()) for k in TABLE}

    def cell(m, k):
        text = rf"{m[k]['mean']:.4f} \pm {m[k]['std']:.4f}"
        return rf"$\mathbf{{{text}}}$" if round(m[k]["mean"], 4) == best[k] else f"${text}$"

    lines = [f"% fedfactory compare: {cfg['data']['name']}, {cfg['partition']['scheme']}, {cfg['partition']['clients']} "
             f"clients; seeds {s['seeds']}; mean +- std over seeds on the real test set; best mean in bold",
             r"\begin{tabular}{l" + "c" * len(TABLE) + "rrrr}", r"\toprule",
             r"method & accuracy & balanced acc. & AUROC & F1 & rounds & wall (s) & up & down \\", r"\midrule"]
    for name, m in methods.items():
        row = ["".join(LATEX_SPECIAL.get(c, c) for c in name), *(cell(m, k) for k in TABLE), str(m["rounds"]),
               f"{m['wall_seconds']:.0f}", _fmt_bytes(m["uploaded_bytes"]), _fmt_bytes(m["downloaded_bytes"])]
        lines.append(" & ".join(row) + r" \\")
    atomic_write_text(out / "comparison.tex", "\n".join([*lines, r"\bottomrule", r"\end{tabular}", ""]))


def _bar_chart(out: Path, s: dict) -> None:
    plt = pyplot()
    names = list(s["methods"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(names), 3.5), dpi=100)
    for i, k in enumerate(("accuracy", "balanced_accuracy", "auroc")):
        means = [s["methods"][n][k]["mean"] for n in names]
        stds = [s["methods"][n][k]["std"] for n in names]
        ax.bar(x + (i - 1) * 0.27, means, 0.27, yerr=stds, label=k, capsize=2)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"{s['config']['data']['name']}, {s['config']['partition']['scheme']}", fontsize=9)
    save_figure(fig, out / "comparison.png")


def _learning_curves(out: Path, s: dict) -> None:
    """Averaging methods' test accuracy by round; one-shot methods as horizontal lines."""
    curves = {n: m["learning_curve"] for n, m in s["methods"].items() if "learning_curve" in m}
    if not curves:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=100)
    for name, pts in curves.items():
        ax.plot([p["round"] for p in pts], [p["accuracy"] for p in pts], marker=".", label=name)
    for name, m in s["methods"].items():
        if name not in curves:
            ax.axhline(m["accuracy"]["mean"], ls="--", lw=1, color="grey")
            ax.annotate(name, (0, m["accuracy"]["mean"]), xycoords=("axes fraction", "data"), fontsize=7,
                        va="bottom", color="dimgrey")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"{s['config']['data']['name']}, {s['config']['partition']['scheme']}", fontsize=9)
    save_figure(fig, out / "learning_curves.png")
