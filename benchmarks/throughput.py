"""Module training and synthesis throughput on this CPU, against a bare torch loop of the same network.

    python benchmarks/throughput.py          # about 5 minutes on 2 idle cores; writes runs/throughput/throughput.json

For each split of the cores into processes x threads (one process with all threads, and the split that
runtime.site_split chooses for training several sites at once), every process trains a cpu-preset diffusion
module on one Fashion-MNIST class with fedfactory's fit, then the same U-Net with a bare torch loop (same
optimizer, EDM loss, bf16 autocast and batch; no EMA, no progress, no device reads), then samples from its
module; the processes run each phase at the same time. It reports images/s and the GFLOP/s they mean
(convolutions and matmuls, counted by torch's FlopCounterMode), and, as the ceiling they are held to, the
rate of a 1024^3 bf16 matrix multiply on the same threads at the same time. It prints a Markdown table for
benchmarks/README.md. `--images 128 --sample 4 --splits single` is a quick check; `--module patch=1
--module channels=16 --module 'channel_mult=[1, 2, 4]'` measures another network shape.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runnable from a checkout without installing

from fedfactory.config import load_config  # noqa: E402
from fedfactory.data import load_dataset  # noqa: E402
from fedfactory.modules.base import SAMPLE_CHUNK  # noqa: E402
from fedfactory.tensors import to_float, use_bf16  # noqa: E402
from fedfactory.modules.diffusion import DiffusionModule, denoise, edm_loss  # noqa: E402
from fedfactory.runtime import DEFAULT_THREADS, site_split  # noqa: E402

BATCH = DiffusionModule.presets["cpu"]["train"]["batch_size"]
SHAPE = (28, 28, 1)  # Fashion-MNIST


def processor() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        model = fields["Model name"].strip()
        # A virtual machine may name only the vendor ("AMD EPYC"); the family tells the generations apart
        # (AMD 25 = Zen 3/4, 26 = Zen 5), and they differ twofold here.
        if "CPU family" in fields:
            model += f" (family {fields['CPU family'].strip()}, model {fields.get('Model', '?').strip()})"
    except (OSError, KeyError):
        model = platform.processor() or platform.machine()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"model": model, "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "cpu_count": os.cpu_count(), "torch_threads": DEFAULT_THREADS, "torch": torch.__version__,
            "bf16": use_bf16(torch.device("cpu"))}


def new_module(images: int, cls: int, arch: dict) -> DiffusionModule:
    return DiffusionModule(arch, {"budget_images": images}, client_id=f"class-{cls}", seed=0, device="cpu",
                           progress=False)


def matmul_rate(n: int = 1024, repeats: int = 20) -> float:
    """GFLOP/s of an n^3 bf16 matrix multiply: what this core's matrix units give a large, dense problem."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def flops(arch: dict) -> dict:
    """FLOPs per training image (one forward and backward of a batch) and per image per sampling call."""
    m = new_module(BATCH, 0, arch)
    m.classes, m.image_shape = [0], SHAPE
    net = m.build_network()
    x, y = torch.rand(BATCH, 1, 28, 28) * 2 - 1, torch.zeros(BATCH, dtype=torch.long)
    with FlopCounterMode(display=False) as train:
        edm_loss(net, x, y, torch.Generator().manual_seed(0)).backward()
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        denoise(net, x, torch.ones(BATCH), y)
    return {"params_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
            "train_GFLOP_per_image": train.get_total_flops() / BATCH / 1e9,
            "forward_GFLOP_per_image": forward.get_total_flops() / BATCH / 1e9,
            "sample_calls_per_image": 2 * m.train_cfg["sample_steps"] - 1}


def bare_loop(m: DiffusionModule, x: torch.Tensor, steps: int) -> float:
    """Images/s of a plain torch loop over the same network: fit's own machinery costs the difference."""
    torch.manual_seed(0)
    net = m.build_network()
    opt = torch.optim.Adam(net.parameters(), lr=m.train_cfg["lr"], betas=(0.9, 0.99))
    gen, y = torch.Generator().manual_seed(0), torch.zeros(BATCH, dtype=torch.long)  # one class: local label 0

    def step():
        batch = x[torch.randint(len(x), (BATCH,), generator=gen)]
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=m.bf16):
            loss = edm_loss(net, batch, y, gen)
        loss.backward()
        opt.step()

    step()  # warm-up: oneDNN builds its kernels for these shapes on first use
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - t)


def worker(cls: int, threads: int, x: np.ndarray, images: int, n: int, arch: dict, barrier, out) -> None:
    """One process: matmul, fit, bare loop, sampling; the barrier starts each phase in every process at once."""
    torch.set_num_threads(threads)
    y = np.full(len(x), cls)
    new_module(BATCH, cls, arch).fit(x, y)  # warm-up: a one-step fit
    barrier.wait()
    row = {"class": cls, "matmul_GFLOP_s": matmul_rate()}
    barrier.wait()
    m = new_module(images, cls, arch).fit(x, y)
    row["fit"] = m.stats["train_images_per_s"]
    barrier.wait()
    row["bare"] = bare_loop(m, to_float(x), math.ceil(images / BATCH))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=m.bf16):  # warm-up: one call
        denoise(m.net, torch.zeros(SAMPLE_CHUNK, 1, 28, 28), torch.ones(SAMPLE_CHUNK), torch.zeros(SAMPLE_CHUNK, dtype=torch.long))
    barrier.wait()
    t = time.perf_counter()
    m.sample(cls, n, seed=0)  # made in whole chunks of SAMPLE_CHUNK images, which the rate counts
    row["sample"] = math.ceil(n / SAMPLE_CHUNK) * SAMPLE_CHUNK / (time.perf_counter() - t)
    out.put(row)


def run_split(processes: int, threads: int, ds, images: int, n: int, arch: dict) -> list[dict]:
    xs = [ds.x_train[ds.y_train == c % 10] for c in range(processes)]  # process i trains class i
    if processes == 1:  # here, with all threads: no start-up to wait for
        out = queue.Queue()
        worker(0, threads, xs[0], images, n, arch, threading.Barrier(1), out)
        return [out.get()]
    ctx = multiprocessing.get_context("spawn")  # as the runners start sites
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(c, threads, xs[c], images, n, arch, barrier, out), daemon=True)
             for c in range(processes)]
    for p in procs:
        p.start()
    rows = []
    try:
        while len(rows) < processes:
            try:
                rows.append(out.get(timeout=1))
            except queue.Empty:
                if any(p.exitcode for p in procs):
                    raise RuntimeError(f"a worker failed: exit codes {[p.exitcode for p in procs]}") from None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    return sorted(rows, key=lambda r: r["class"])


def summarize(rows: list[dict], fl: dict, n: int) -> tuple[dict, dict]:
    """Per-process and total images/s (the processes ran at once, so their rates add) and GFLOP/s."""
    fit, bare = sum(r["fit"] for r in rows), sum(r["bare"] for r in rows)
    matmul = sum(r["matmul_GFLOP_s"] for r in rows)
    train = {"fit_images_per_s": round(fit, 1), "bare_images_per_s": round(bare, 1),
             "fit_GFLOP_s": round(fit * fl["train_GFLOP_per_image"], 2),
             "bare_GFLOP_s": round(bare * fl["train_GFLOP_per_image"], 2), "fit_share_of_bare": round(fit / bare, 3),
             "matmul_GFLOP_s": round(matmul, 1), "fit_share_of_matmul": round(fit * fl["train_GFLOP_per_image"] / matmul, 3),
             "per_process": [{"class": r["class"], "fit": round(r["fit"], 1), "bare": round(r["bare"], 1)} for r in rows]}
    sample = sum(r["sample"] for r in rows)
    samp = {"images_per_s": round(sample, 2), "images_made": math.ceil(n / SAMPLE_CHUNK) * SAMPLE_CHUNK,
            "GFLOP_s": round(sample * fl["sample_calls_per_image"] * fl["forward_GFLOP_per_image"], 2),
            "per_process": [round(r["sample"], 2) for r in rows]}
    return train, samp


def each(values: list[float], digits: int = 0) -> str:
    """The processes' own figures, after their total: " (170 + 171)"."""
    return f" ({' + '.join(f'{v:.{digits}f}' for v in values)})" if len(values) > 1 else ""


def arch_note(arch: dict) -> str:
    return f" with {', '.join(f'{k} = {v}' for k, v in arch.items())}" if arch else ""


def table_md(res: dict) -> str:
    p, fl = res["processor"], res["flops"]
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if p[f]]
    lines = [f"{p['model']} ({', '.join(bf16) or 'no bf16 units'}), {p['cpu_count']} cores, torch {p['torch']}, "
             f"bf16 autocast {'on' if p['bf16'] else 'off'}. cpu-preset U-Net{arch_note(res['settings']['arch'])} "
             f"at 28 px, {fl['params_M']}M parameters: "
             f"{fl['train_GFLOP_per_image']:.3f} GFLOP per training image, {fl['sample_calls_per_image']} calls x "
             f"{fl['forward_GFLOP_per_image']:.3f} GFLOP per sampled image.", "",
             "| split | processes x threads | fit images/s | bare loop images/s | fit / bare | fit GFLOP/s | bare GFLOP/s "
             "| bf16 matmul GFLOP/s | fit / matmul | sampling images/s | sampling GFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, t in res["training"].items():
        s = res["sampling"][key]
        lines.append(f"| {t['label']} | {key} | {t['fit_images_per_s']:.0f}{each([r['fit'] for r in t['per_process']])} "
                     f"| {t['bare_images_per_s']:.0f}{each([r['bare'] for r in t['per_process']])} | {t['fit_share_of_bare']:.2f} "
                     f"| {t['fit_GFLOP_s']:.1f} | {t['bare_GFLOP_s']:.1f} | {t['matmul_GFLOP_s']:.0f} "
                     f"| {t['fit_share_of_matmul']:.0%} | {s['images_per_s']:.1f}{each(s['per_process'], 1)} "
                     f"| {s['GFLOP_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "throughput")
    ap.add_argument("--images", type=int, default=6400, help="training images per fit and per bare loop")
    ap.add_argument("--sample", type=int, default=200, help="images sampled per process (made, and counted, in whole chunks of 100)")
    ap.add_argument("--sites", type=int, default=10, help="sites the automatic split is chosen for")
    ap.add_argument("--splits", default="single,auto", help="comma-separated: single, auto or PxT (e.g. 2x1)")
    ap.add_argument("--module", action="append", default=[], metavar="KEY=VALUE",
                    help="an arch key of the U-Net in place of the cpu preset's, as in --set module.KEY=VALUE")
    args = ap.parse_args(argv)
    cfg = load_config(None, ["runtime.device=cpu", *(f"module.{kv}" for kv in args.module)])
    arch = dict(cfg.module.overrides)
    if set(arch) - set(DiffusionModule.presets["cpu"]["arch"]):
        ap.error(f"--module takes the U-Net's arch keys: {', '.join(DiffusionModule.presets['cpu']['arch'])}")
    named = {"single": (1, DEFAULT_THREADS), "auto": site_split(cfg, args.sites)}
    splits: dict[tuple[int, int], str] = {}
    for name in args.splits.split(","):
        pt = named[name] if name in named else tuple(int(v) for v in name.split("x"))
        splits[pt] = f"{splits[pt]}, {name}" if pt in splits else name  # auto may be the single split
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"settings": {"images": args.images, "sample": args.sample, "sites": args.sites, "batch": BATCH, "arch": arch},
           "processor": processor(), "flops": flops(arch), "training": {}, "sampling": {}}

    def save():
        (args.out / "throughput.json").write_text(json.dumps(res, indent=2) + "\n")

    save()
    ds = load_dataset("fashion-mnist")
    for (procs, threads), label in splits.items():
        print(f"-- {label}: {procs} process(es) x {threads} thread(s)", flush=True)
        train, samp = summarize(run_split(procs, threads, ds, args.images, args.sample, arch), res["flops"], args.sample)
        res["training"][f"{procs}x{threads}"] = {"label": label, **train}
        res["sampling"][f"{procs}x{threads}"] = {"label": label, **samp}
        save()
    print(table_md(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
