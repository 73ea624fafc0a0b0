"""Hashes of everything a short run computes, to show that a refactor changed no bit.

Three toy runs on scikit-learn's digits (8 x 8 px, four classes): a diffusion run, a cVAE run and
a DP-SGD diffusion run. For each it prints the SHA-256 of every module's weights, of one batch of
samples drawn from each module with a fixed seed, of every synthetic shard and of the classifier's
weights. Tensors are hashed, not files, so metadata may change while the numbers may not.

    python benchmarks/determinism_hashes.py > before.json   # on the old commit
    python benchmarks/determinism_hashes.py > after.json    # on the new one
    diff before.json after.json
"""

import contextlib
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import secrets

import numpy as np
from safetensors.numpy import load_file
from sklearn.datasets import load_digits

import fedfactory
from fedfactory.cli import main
from fedfactory.modules import load_module

UNET = ["module.channels=8", "module.channel_mult=[1, 2]", "module.num_blocks=1", "module.sample_steps=3"]
RUNS = {
    "diffusion": UNET,
    "cvae": ["module.kind='cvae'", "module.channels=8"],
    "dp": UNET + ["privacy.noise_multiplier=1.0", "privacy.accountant='rdp'"],
}


def toy_sets(npz: Path) -> list[str]:
    return [f"data.name='npz:{npz}'", "partition.clients=4",
            "module.budget_images=1024", "module.batch_size=32",
            "factory.per_class=32", "classifier.budget_images=1024", "classifier.batch_size=64",
            "classifier.width=8", "quality.reference_budget=0", "runtime.progress=false",
            "runtime.parallel_clients=1", "runtime.threads=1"]


def digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def weights(path: Path) -> str:
    tensors = load_file(path)
    return digest(tensors[k] for k in sorted(tensors))


def hashes(run: Path) -> dict:
    out = {}
    for m in sorted((run / "modules").iterdir()):
        out[f"module {m.name}"] = weights(m / "module.safetensors")
        module = load_module(m)
        out[f"samples {m.name}"] = digest([module.sample(module.classes[0], 8, seed=123)])
    for name, entry in json.loads((run / "synthetic" / "index.json").read_text()).items():
        shard = np.load(run / "synthetic" / f"{name}.npy", allow_pickle=False)
        out[f"shard {entry['client']} class {entry['class']}"] = digest([shard])
    for clf in sorted((run / "classifiers").glob("*.safetensors")):
        out[f"classifier {clf.stem}"] = weights(clf)
    return out


def main_() -> int:
    # DP-SGD draws its noise seed from the operating system on purpose; fixed here so that two
    # commits can be compared bit for bit
    secrets.randbits = lambda bits: 20261207
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        d = load_digits()
        x, y = (d.images * 255 / 16).astype(np.uint8), d.target
        keep = y < 4
        x, y = x[keep], y[keep]
        npz = tmp / "digits.npz"
        np.savez(npz, x_train=x[::2], y_train=y[::2], x_test=x[1::2], y_test=y[1::2])
        config = tmp / "defaults.toml"
        config.write_text("")  # the defaults: the main job's config pins diffusion-only keys
        result = {}
        for name, extra in RUNS.items():
            sets = toy_sets(npz) + extra
            with contextlib.redirect_stdout(sys.stderr):
                rc = main(["run", str(config), "--out", str(tmp / name), *sum((["--set", s] for s in sets), [])])
            if rc != 0:
                print(f"run {name} failed", file=sys.stderr)
                return rc
            result[name] = hashes(tmp / name)
    print(f"fedfactory from {Path(fedfactory.__file__).parent}", file=sys.stderr)
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main_())
