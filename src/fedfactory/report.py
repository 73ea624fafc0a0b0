"""report.md, the synthetic-vs-real sample grid, the confusion-matrix plot, and the training curves
(curves.csv and the modules' loss plot)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from .utils import atomic_write_bytes, atomic_write_csv, atomic_write_text


def sample_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Rows of uint8 N x H x W x C images -> one uint8 H' x W' x 3 picture (white gaps)."""
    h, w = rows[0].shape[1:3]
    n = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            grid[pad + i * (h + pad): pad + i * (h + pad) + h, pad + j * (w + pad): pad + j * (w + pad) + w] = \
                np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img
    return grid


def save_png(path: Path, pixels: np.ndarray, scale: int = 1) -> None:
    im = Image.fromarray(pixels)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def synthetic_vs_real(path: Path, synth_x, synth_y, real_x, real_y, num_classes: int, per_row: int = 8) -> None:
    """For every class: a row of synthetic images, then a row of real ones."""
    rows = []
    empty = np.zeros((0, *real_x.shape[1:]), np.uint8)
    for c in range(num_classes):
        rows.append(synth_x[synth_y == c][:per_row] if len(synth_x) else empty)
        rows.append(real_x[real_y == c][:per_row])
    rows = [r if len(r) else np.full((1, *real_x.shape[1:]), 255, np.uint8) for r in rows]
    size = real_x.shape[1]
    save_png(path, sample_grid(rows), scale=max(1, 64 // size))


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write a figure as PNG atomically and free it."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def confusion_png(path: Path, cm: list[list[int]], class_names: list[str], title: str) -> None:
    plt = pyplot()
    cm = np.asarray(cm)
    n = len(cm)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n), dpi=100)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), [c[:12] for c in class_names], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), [c[:12] for c in class_names], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


# curves.csv: one row per point. step: the optimizer step (a weight-averaging method's: the round);
# images_seen: training images up to it (blank when unknown); loss: the mean training loss since the last point.
CURVES, CURVE_COLUMNS, MODULE_CURVES = "curves.csv", ("series", "step", "images_seen", "loss"), "module_curves.png"


def curve_rows(series: str, points: list[dict]) -> list[dict]:
    """A curve's points ({"step", "images_seen", "loss"}) as curves.csv rows named `series`."""
    return [{"series": series, **p} for p in points]


def write_curves(path: Path, rows: list[dict]) -> None:
    atomic_write_csv(path, CURVE_COLUMNS, [{**r, "loss": f"{r['loss']:.6g}"} for r in rows])


def read_curves(path: Path) -> list[dict]:
    """curves.csv's rows (none when there is no file), numbers as numbers."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{"series": r["series"], "step": int(r["step"]), "loss": float(r["loss"]),
                 **({"images_seen": int(r["images_seen"])} if r.get("images_seen") else {})} for r in csv.DictReader(f)]


def module_curves_png(path: Path, rows: list[dict]) -> bool:
    """The training loss of every module (the rows of series module/<client>), one line each, against
    the images it has seen; False (no picture) when there is none."""
    series = {}
    for r in rows:
        if r["series"].startswith("module/"):
            series.setdefault(r["series"].removeprefix("module/"), []).append(r)
    if not series:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=100)
    for cid, pts in series.items():
        ax.plot([p.get("images_seen", p["step"]) for p in pts], [p["loss"] for p in pts], lw=1, label=cid)
    losses = [r["loss"] for pts in series.values() for r in pts if math.isfinite(r["loss"])]
    if losses and min(losses) > 0 and max(losses) > 10 * min(losses):  # a loss falling by decades: a log scale
        ax.set_yscale("log")
    ax.set_xlabel("training images seen")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7, ncol=max(1, len(series) // 8))
    ax.set_title("generative modules", fontsize=9)
    save_figure(fig, path)
    return True


METRICS = ("accuracy", "balanced_accuracy", "auroc", "f1", "precision", "recall")


def privacy_table(modules: list[dict], local_mode: bool = False) -> list[str]:
    """Each module's privacy audit and DP terms, numbers only (the sites keep their pictures)."""
    def num(v, fmt=".3f"):
        return "-" if v is None else f"{v:{fmt}}"

    lines = ["## Privacy (each site's audit before upload; numbers only)", "",
             "| client | copy rate | closer to train | p | MIA AUC | p | DP epsilon (delta) | audit |",
             "|---|---|---|---|---|---|---|---|"]
    for mod in modules:
        a, dp = mod.get("privacy", {}).get("audit", {}), mod.get("privacy", {}).get("dp")
        eps = f"{dp['epsilon']:.2f} ({dp['delta']:.1e})" if dp else "none"
        verdict = "-" if not a else ("passed" if a.get("passed") else "FAILED")
        lines.append(f"| {mod['client']} | {num(a.get('copy_rate'))} | {num(a.get('closer_to_train'))} | "
                     f"{num(a.get('train_vs_held_out_p'), '.2g')} | {num(a.get('mia_auc'))} | {num(a.get('mia_p'), '.2g')} | "
                     f"{eps} | {verdict} |")
    lines += ["", "Copy rate: generated images whose nearest training image is under a third of the distance of "
              "the second nearest. Closer to train: share of generated images nearer a training than a held-out "
              "image (0.5 = no preference). MIA AUC: a loss-threshold membership attack (0.5 = nothing leaks). "
              "p: one-sided tests. Epsilon covers each training image's influence on the weights, not the class "
              "counts in the manifest or the choice of settings.", ""]
    if local_mode:
        lines += ["Local mode: each site also sent its expert, a classifier trained on its real images. This audit "
                  "covers the modules only; the experts have no audit and no DP.", ""]
    return lines


def quality_table(quality: dict, class_names: list[str], accuracy: float) -> list[str]:
    """Each module's samples against the real test images of its class (quality.py), or why not measured."""
    lines = ["## Module quality (synthetic against real test images, per module and class)", ""]
    if "modules" not in quality:
        return lines + [quality.get("note", "not measured"), ""]
    ref = quality["reference"]
    lines += ["| client | class | FD | precision | recall | density | coverage | synthetic | real |",
              "|---|---|---|---|---|---|---|---|---|"]
    for cid, per_class in quality["modules"].items():
        for c, q in per_class.items():
            vals = " | ".join("-" if q[k] is None else f"{q[k]:.4g}" for k in ("fid", "precision", "recall", "density",
                                                                              "coverage"))
            lines.append(f"| {cid} | {class_names[int(c)]} | {vals} | {q['synthetic']} | {q['real']} |")
    return lines + ["", f"{quality['note']} The reference classifier ({ref['budget_images']:,} images) reaches "
                    f"{ref['test_accuracy']:.4f} test accuracy. FD: Fréchet distance of the features (lower is "
                    f"closer; in this feature space, not comparable with published FIDs). Precision: share of "
                    f"synthetic images inside the real images' {quality['k']}-NN manifold (fidelity); recall: the "
                    "converse (diversity); density and coverage: their outlier-robust versions (Naeem et al. 2020). "
                    "A module far above the others in FD, or low in precision or coverage, is a weak site.", ""] + (
        [f"The reference is the run's classifier recipe and budget on the sites' real images, i.e. centralized "
         f"training: this run's accuracy is **{accuracy / max(ref['test_accuracy'], 1e-12):.3f}x** of it.", ""]
        if ref.get("centralized") else [])


def evaluation_lines(results: dict) -> list[str]:
    """The metrics, and which evaluation they come from: the coordinator's test set, or the sites' own
    test images pooled from their counts (then each site's too)."""
    m, ev = results["metrics"], results.get("evaluation", {"by": "coordinator", "sites": {}})
    if not m:
        return ["**Metrics pending:** the coordinator holds no test images; each site evaluates the classifier "
                "(`fedfactory site evaluate`) and `fedfactory server pool` adds their answers here.", ""]
    if ev["by"] == "sites":
        where = (f"Evaluated by the sites on their own test images ({results['test']['images']:,} in all), "
                 "pooled from counts they sent: a confusion matrix and score histograms, no image and no per-image "
                 "score. AUROC comes from the histograms (within a score bin of the exact value).")
    else:
        where = f"Evaluated at the coordinator on its test set ({results['test']['name']}, {results['test']['images']:,} images)."
    lines = [where, "", "| metric | value |", "|---|---|", *[f"| {k} | {m[k]:.4f} |" for k in METRICS], ""]
    if ev["sites"]:
        lines += ["Each site on its own test images:", "", "| site | test images | " + " | ".join(METRICS) + " |",
                  "|---|---|" + "---|" * len(METRICS)]
        lines += [f"| {cid} | {s['images']} | " + " | ".join(f"{s['metrics'][k]:.4f}" for k in METRICS) + " |"
                  for cid, s in ev["sites"].items()]
        lines.append("")
    return lines


def model_lines(results: dict, class_names: list[str]) -> list[str]:
    """What the classifier is and how to use it: the model card's first section."""
    cfg, ds, model = results["config"], results["dataset"], results.get("model", {})
    h, w, c = ds["image_shape"]
    clf, nets = cfg["classifier"], sorted(results.get("classifier", {}))
    arch = f"ResNet ({clf['preset']} preset" + (f", width {clf['width']})" if clf["width"] else ")")
    decides = (f"one {arch} trained at the server on the synthetic images" if clf["mode"] == "server" else
               f"a Product of Experts of {len(nets)} site experts, each a {arch}: the sum of their log-softmax, "
               f"renormalised ({', '.join(nets)})")
    missing = [class_names[i] for i in results.get("missing_classes", [])]
    f = model.get("file", "model.safetensors")
    return ["## Model", "", "| | |", "|---|---|",
            f"| file | `{f}`" + (f" (SHA-256 `{model['sha256'][:16]}`)" if model.get("sha256") else "") +
            f", fedfactory {results.get('library_version', '?')} |",
            f"| decision | {decides} |",
            f"| input | uint8 {h} x {w} x {c} images ({'grey' if c == 1 else 'colour'}); `fedfactory predict` and "
            f"`load_classifier` resize other sizes bilinearly, as the sites' loaders do; pixels map to [-1, 1] "
            f"as x / 127.5 - 1 |",
            f"| output | a probability for each of {len(class_names)} classes: {', '.join(class_names)} |",
            f"| never predicted | {', '.join(missing) or 'none'} |",
            f"| use | `fedfactory predict {f} --images DIR --out predictions.csv`; `fedfactory export {f} --format "
            f"onnx --out model.onnx`; in Python `fedfactory.load_classifier(\"{f}\").predict_proba(images)` |", ""]


def intended_use_lines(results: dict, class_names: list[str]) -> list[str]:
    k = len(class_names)
    return ["## Intended use", "",
            f"Sorting images like the sites' own ({results['dataset']['name']}) into its {k} classes "
            f"({', '.join(class_names)}), for research and for validation at each site. It is not a medical "
            "device and no clinical decision should rest on it: a site evaluates it on its own labelled images first "
            "(`fedfactory predict` on class folders prints the accuracy). It always answers one of its "
            f"{k} classes, so an image of anything else (another finding, body part or modality) still gets one.", ""]


def limitation_lines(results: dict, class_names: list[str]) -> list[str]:
    """What the classifier was trained on, where it was evaluated, and what was not tested."""
    cfg, test, ev = results["config"], results["test"], results.get("evaluation", {"by": "coordinator", "sites": {}})
    synth = results.get("synthetic", {}).get("images", 0)
    if cfg["classifier"]["mode"] == "server":
        trained = (f"**Trained on synthetic images only**: {synth:,} images drawn from the sites' generative modules. "
                   "The classifier never saw a real image, so what the modules did not learn of a class it does not know.")
    else:
        trained = ("**Each expert was trained on its site's real images plus synthetic images** of the classes the site "
                   "lacks, drawn from the other sites' modules; no expert saw another site's real images.")
    if not results["metrics"]:
        where = "**Not evaluated yet**: no site has sent an evaluation."
    elif ev["by"] == "sites":
        where = ("**Evaluated by the sites** on their own test images: " +
                 ", ".join(f"{cid} ({s['images']})" for cid, s in ev["sites"].items()) + ".")
    elif not test.get("source"):
        where = (f"**Evaluated on the held-out test split of {cfg['data']['name']}**, the public data set the simulated "
                 f"sites were cut from ({test['images']:,} images): the same source as the training images.")
    else:
        where = f"**Evaluated at the coordinator** on {test['name']} ({test['images']:,} images)."
    totals = np.sum(list(results["clients"].values()), axis=0) if results["clients"] else np.zeros(len(class_names))
    low = int(np.argmin(totals))
    lines = ["## Limitations", "", f"- {trained}", f"- {where}",
             f"- The fewest real training images were of {class_names[low]} ({int(totals[low]):,}); a class's "
             "synthetic images are only as varied as its modules' training images.",
             "- **Not tested**: images from other hospitals, scanners, protocols or populations than the sites'; "
             "subgroups (age, sex: the data holds no such fields); images of none of the classes; corrupted or "
             "adversarial inputs; drift over time; calibration (the probabilities are the networks' softmax, not "
             "calibrated)."]
    if results.get("missing_classes"):
        lines.append(f"- Never predicted (no module covered them): {', '.join(class_names[c] for c in results['missing_classes'])}.")
    if not any("dp" in m.get("privacy", {}) for m in results["modules"]):
        lines.append("- No module was trained with differential privacy: the site audits measure leaks, they bound nothing.")
    return lines + [""]


def per_class_lines(results: dict, class_names: list[str]) -> list[str]:
    m = results["metrics"]
    cm = np.asarray(m["confusion_matrix"]) if m else None
    holders = {c: [mod["client"] for mod in results["modules"] if c in mod["classes"]] for c in range(len(class_names))}
    totals = np.sum(list(results["clients"].values()), axis=0) if results["clients"] else np.zeros(len(class_names), int)
    lines = ["## Per class", "", "| class | real training images | test accuracy (recall) | precision | test images | modules |",
             "|---|---|---|---|---|---|"]
    for c, name in enumerate(class_names):
        acc = m["per_class_accuracy"][c] if m else None
        prec = cm[c, c] / cm[:, c].sum() if m and cm[:, c].sum() else None
        lines.append(f"| {name} | {int(totals[c]):,} | {'-' if acc is None else f'{acc:.3f}'} | "
                     f"{'-' if prec is None else f'{prec:.3f}'} | {int(cm[c].sum()) if m else '-'} | "
                     f"{', '.join(holders[c]) or 'none'} |")
    return lines + [""]


def mix_lines(results: dict, class_names: list[str]) -> list[str]:
    """Who decided each shared class's synthetic images: the consortium's agreement, the share cap, and the
    modules' check of each other (crosscheck.py)."""
    f = results["config"]["factory"]
    shared = [c for c in range(len(class_names)) if sum(c in mod["classes"] for mod in results["modules"]) > 1]
    if not shared:
        return []
    lines = ["## Classes that several sites hold", ""]
    if results.get("agreement"):
        lines.append(f"Every module was within its site's agreement in the consortium's roster ({results['agreement']}).")
    elif f["aggregation"] == "weighted":
        lines.append("**No consortium agreement** (`federation.roster`): each site's declared counts decide the mix "
                     f"of a class it shares, bounded only by `factory.max_share` = {f['max_share']:g}.")
    check = results.get("crosscheck") or {}
    if check.get("flagged"):
        lines.append("The modules' check of each other flagged " + "; ".join(
            f"**{cid}** on {', '.join(class_names[c] for c in cs)}" for cid, cs in check["flagged"].items()) +
            (f"; untrusted (flagged on most of what it shares): **{', '.join(check['untrusted'])}**" if check["untrusted"] else "")
            + (". Their draws were left out of synthesis." if check.get("dropped") else ". Reported only (`factory.outliers = \"flag\"`)."))
    elif check.get("checked"):
        lines.append("The modules that share a class checked each other's draws of it; none was flagged.")
    return lines + ["A class that only one site holds cannot be checked by anyone.", ""]


def write_report(run_dir: Path, results: dict, class_names: list[str], extra: str = "") -> Path:
    """report.md, a model card: the model, its intended use, metrics (overall, per class, per site), the data
    by site, privacy, module quality, limitations, timings and pictures."""
    m = results["metrics"]
    cfg = results["config"]
    lines = [
        f"# Model card: FederatedFactory classifier, {results['dataset']['name']}, {results['dataset']['partition']}, "
        f"{len(results['clients'])} sites, {cfg['classifier']['mode']} mode",
        "",
        f"Seed {cfg['seed']}; {cfg['module']['kind']} modules ({cfg['module']['preset']} preset); "
        f"{cfg['factory']['per_class']} synthetic images per class; one round of module exchange.",
        "",
        *model_lines(results, class_names),
        *intended_use_lines(results, class_names),
        "## Metrics", "",
        *evaluation_lines(results),
    ]
    if extra:
        lines += [extra, ""]
    if results.get("missing_classes"):
        names = ", ".join(class_names[c] for c in results["missing_classes"])
        lines += [f"**Classes no module covers (left out of synthesis, never predicted):** {names}", ""]
    lines += per_class_lines(results, class_names)
    lines += ["## Data by site (real training images per class; they never left the site)", "",
              "| site | " + " | ".join(n[:10] for n in class_names) + " | total |",
              "|---|" + "---|" * (len(class_names) + 1)]
    lines += [f"| {cid} | " + " | ".join(map(str, cnt)) + f" | {sum(cnt)} |" for cid, cnt in results["clients"].items()]
    lines += ["", "## Modules", "", "| client | classes | SHA-256 | bytes |", "|---|---|---|---|"]
    lines += [f"| {mod['client']} | {mod['classes']} | `{mod['sha256'][:16]}` | {mod['bytes']} |" for mod in results["modules"]]
    lines += ["", *mix_lines(results, class_names)]
    lines += ["", *privacy_table(results["modules"], results["config"]["classifier"]["mode"] == "local")]
    if "quality" in results:
        lines += quality_table(results["quality"], class_names, m["accuracy"] if m else float("nan"))
    lines += limitation_lines(results, class_names)
    lines += ["## Wall time (seconds)", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["timings"].items()]
    real = results["test"]["images"] and results.get("evaluation", {}).get("by") != "sites"
    lines += ["", "## Pictures", "", "Synthetic (odd rows) beside real (even rows), one pair of rows per class:" if real
              else "Synthetic images, one row per class (the coordinator holds no real image: the rows between are "
              "empty):", "", "![samples](samples.png)", ""] + (["![confusion matrix](confusion.png)", ""] if m else [])
    if (run_dir / MODULE_CURVES).exists():
        lines += [f"Training loss of each site's module ({CURVES} holds every curve, the classifier's too):", "",
                  f"![module training loss]({MODULE_CURVES})", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
