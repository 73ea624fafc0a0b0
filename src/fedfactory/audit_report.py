"""The site's own report of its module's privacy audit (privacy/audit.py measures; this writes).

It shows training images, so it stays at the site. It sits at the site's layer because it draws
with report.py's pictures; privacy/ itself writes nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .report import sample_grid, save_png
from .utils import atomic_write_text


def write_site_report(folder: Path, client_id: str, result: dict, pairs: list) -> Path:
    """The site's own audit report: its numbers and the closest pairs, worst first. It shows training
    images, so it stays at the site: it is written beside the module folder, never inside it."""
    folder.mkdir(parents=True, exist_ok=True)
    if pairs:  # two rows per line of 8: generated images above their nearest training images
        rows = []
        for i in range(0, len(pairs), 8):
            chunk = pairs[i : i + 8]
            rows += [np.stack([g for _, g, _ in chunk]), np.stack([t for _, _, t in chunk])]
        save_png(folder / "closest_pairs.png", sample_grid(rows), scale=2)
    keys = ("copy_rate", "copy_rate_features", "closer_to_train", "train_vs_held_out_p", "mia_auc", "mia_p")
    lines = [f"# Privacy audit of {client_id}'s module (site only: this folder shows training images)", "",
             f"**{'passed' if result.get('passed', True) else 'FAILED'}**" +
             ("" if result.get("passed", True) else ": " + "; ".join(result.get("reasons", []))), "",
             "| measure | value |", "|---|---|",
             *[f"| {k} | {result[k]:.4f} |" for k in keys if k in result], "",
             "## Per class", "", "| class | generated | train | held out | copy rate | closer to train | MIA AUC |",
             "|---|---|---|---|---|---|---|"]
    for c, row in result["per_class"].items():
        lines.append(f"| {c} | {row['generated']} | {row['train']} | {row['held_out']} | {row['copy_rate']:.3f} | "
                     f"{row.get('closer_to_train', float('nan')):.3f} | {row.get('mia_auc', float('nan')):.3f} |")
    lines += ["", "## Closest pairs", "",
              "Each generated image (upper row) above its nearest training image (lower row), the closest "
              "(lowest d1/d2) first. Near-identical pairs are copies.", "", "![closest pairs](closest_pairs.png)", "",
              "What this does not promise: an audit measures leaks that these tests can see, at this sample size. "
              "Only differential privacy (privacy.epsilon) bounds what any attack can learn.", ""]
    path = folder / "audit.md"
    atomic_write_text(path, "\n".join(lines))
    return path
