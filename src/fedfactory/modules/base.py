"""The generative module: what a client trains on its own data and uploads once.

Shape of the API (scikit-learn-like, plain arrays in and out):

    module = DiffusionModule(arch, train, client_id="client-3", seed=0).fit(images, labels)
    images = module.sample(class_id=3, n=1000, seed=42)      # uint8 N x H x W x C
    module.save("modules/client-3"); module = load_module("modules/client-3")

A client with several classes trains ONE class-conditional network over them. Subclasses
define the network, the loss and the sampler, and declare their capabilities to the registry
(registry.py); this file holds what they share: the seeded training loop (batches, EMA, bf16; a
trainer from training.py plans and steps it, DP-SGD being privacy/'s), chunked seeded sampling,
and the manifest. Loading a module folder is loading.py's.
"""

from __future__ import annotations

import copy
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..errors import FedFactoryError
from ..tensors import resolve_device, to_model, to_uint8, use_bf16
from ..utils import LossCurve, derive_seed, ema_step
from .fileformat import serialize, write_module_dir
from .limits import is_int
from .training import Trainer, default_trainer

# Images are generated in fixed chunks, each with its own noise stream: asking for n images
# always gives the first n of the same sequence, whatever n is (what makes synthesis exact).
SAMPLE_CHUNK = 100
# A GPU samples several chunks per network call (about this many pixels), a CPU one: small
# calls are launch-bound on a large GPU, and on a CPU one chunk keeps the shipped bits.
GPU_SAMPLE_PIXELS = 1 << 21
# fit's on_progress is called at most this often (seconds): enough for a display, a negligible cost.
PROGRESS_EVERY = 1.0


def chunks_per_call(device: torch.device, image_shape: tuple[int, int, int]) -> int:
    h, w, _ = image_shape
    return max(1, GPU_SAMPLE_PIXELS // (SAMPLE_CHUNK * h * w)) if device.type == "cuda" else 1


@dataclass
class _Run:
    """One fit's state, passed between its steps (a record: its generated __init__ takes every field)."""
    trainer: Trainer
    net: torch.nn.Module        # the trained weights
    train_net: torch.nn.Module  # what the loss calls (compiled, or net itself)
    ema: torch.nn.Module        # what is shipped and sampled
    opt: torch.optim.Optimizer
    pixels: torch.Tensor        # uint8 N x H x W x C on the device
    y_all: torch.Tensor         # local labels on the device
    gen: torch.Generator        # the loss's noise and flips
    batches: object             # per-step index tensors (the trainer's)
    batch: int
    steps: int
    k: int                      # rows per image (DP noise multiplicity)
    warmup: int                 # warm-up steps
    t0: float = 0.0


class GenerativeModule(ABC):
    kind: str = ""
    # Per-kind defaults: `arch` (network shape), `train` (budget, batch, lr, ...) and optionally
    # `dp_train`, the `train` values that replace them under DP-SGD (a key the config sets wins).
    presets: dict[str, dict] = {}
    # `train` keys that only decide how a trained network is sampled: changing them needs no retraining.
    sampling_keys: tuple[str, ...] = ()
    # -- what a kind declares to the registry (modules/registry.py) ------------------------
    samplers: tuple[str, ...] = ()  # the names train["sampler"] may take (none: no such choice)
    # Checks of module keys that a config sets: key -> "positive" | "non-negative" (config.py applies them).
    key_rules: dict[str, str] = {"budget_images": "positive", "batch_size": "positive", "lr": "positive",
                                 "warmup_images": "non-negative", "ema_halflife_images": "non-negative"}
    # Optional: a method (images uint8 N x H x W x C, global labels, seed) -> per-image loss (np.ndarray), lower
    # on images the module trained on; the privacy audit's membership attack calls it (none: no attack).
    per_example_loss = None
    per_example_loss_info: dict = {}  # what the audit records beside the attack's numbers

    @classmethod
    def config_keys(cls) -> dict[str, object]:
        """Every module key this kind reads (its presets' arch and train keys), with an example value."""
        keys: dict[str, object] = {}
        for preset in cls.presets.values():
            for part in ("arch", "train"):
                for k, v in preset[part].items():
                    keys.setdefault(k, v)
        return keys

    @classmethod
    def arch_rules(cls, limits) -> dict:
        """arch key -> is a peer's declared value within `limits` (modules/limits.py)? A key without a rule is refused."""
        return {}

    @classmethod
    def training_rules(cls, limits) -> dict:
        """training key -> is a peer's declared value safe to run (bounded: synthesis cannot hang or produce NaN)?"""
        rules = {"seed": is_int}
        if cls.samplers:
            rules["sampler"] = lambda v: v in cls.samplers
        return rules

    # many parameters because each is one setting of the module (network, budget, identity, seed, preset,
    # device, precision, display, compile, DP), all keywords with defaults, as a scikit-learn estimator's
    def __init__(self, arch: dict | None = None, train: dict | None = None, client_id: str = "client",
                 seed: int = 0, preset: str = "cpu", device: str = "auto", bf16: str = "auto",
                 progress: bool = True, compile: bool = False, dp: dict | None = None):
        if preset not in self.presets:
            raise FedFactoryError(f"{self.kind}: unknown preset {preset!r}; use one of {', '.join(self.presets)}")
        preset = self.presets[preset]
        self.arch = {**preset["arch"], **(arch or {})}
        self.train_cfg = {**preset["train"], **(preset.get("dp_train", {}) if dp else {}), **(train or {})}
        self.client_id, self.seed = client_id, int(seed)
        self.device = resolve_device(device)
        self.bf16 = use_bf16(self.device, bf16)
        self.progress = progress
        self.compile = compile  # torch.compile for training, GPU only (slower on this CPU)
        self.dp = dp            # DP-SGD settings (privacy/dp.py), or None
        self.classes: list[int] = []   # global class ids this module covers
        self.counts: list[int] = []    # real training images of each
        self.image_shape: tuple[int, int, int] | None = None
        self.net: torch.nn.Module | None = None   # EMA weights: what is shipped and sampled
        self.stats: dict = {}
        # fit's training loss, every few steps ({"step", "images_seen", "loss"}): kept at the site (the
        # runners write it to curves.csv), never in the manifest, which travels and is size-checked
        self.curve: list[dict] = []
        self.privacy: dict = {}  # {"audit": ..., "dp": ...}: what the module reveals (privacy/)
        self.audit_pairs: list | None = None  # the audit's closest pairs (training images): never saved with it
        self.site: dict = {}  # the site's terms: its policy and the config it trained under (policy.py)

    # -- what a kind defines ------------------------------------------------------------
    @abstractmethod
    def build_network(self) -> torch.nn.Module: ...

    @abstractmethod
    def loss(self, net: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor: ...

    @abstractmethod
    def noise_shape(self) -> tuple[int, ...]:
        """The shape of one image's sampling noise (drawn from N(0, I))."""

    @abstractmethod
    def generate(self, labels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] for local labels, from the EMA network, deterministic given `noise`."""

    # -- shared machinery ------------------------------------------------------------
    @property
    def num_local_classes(self) -> int:
        return len(self.classes)

    def fit(self, images: np.ndarray, labels: np.ndarray, checkpoint=None, checkpoint_every: int = 0,
            on_progress=None, trainer: Trainer | None = None) -> "GenerativeModule":
        """Train from scratch on one client's images (uint8 N x H x W x C) and labels.

        `trainer` (modules/training.py) plans the batches and steps the optimizer: plain training by
        default; DP-SGD with privacy.DPTrainer (also the default of a module built with `dp` settings),
        whose claim goes to `privacy["dp"]`. `checkpoint(images_seen, ema_network)` is called every
        `checkpoint_every` steps; `on_progress(steps_done, steps, images_seen, seconds)` about once a
        second and once at the end."""
        local = self._take_data(images, labels)
        run = self._start(images, local, trainer or default_trainer(self))
        seen, loss_avg, curve = self._loop(run, checkpoint, checkpoint_every, on_progress)
        for be, b in zip(run.ema.buffers(), run.net.buffers()):
            be.copy_(b)
        self.net = run.ema.eval()
        # Reading the loss waits for the device's queued work, so the wall time below is true.
        final_loss, self.curve = (float("nan"), []) if loss_avg is None else curve.read(loss_avg)
        wall = time.perf_counter() - run.t0
        self.stats = {"train_seconds": round(wall, 2), "train_images_per_s": round(seen / wall, 1),
                      "images_seen": seen, "final_loss": round(final_loss, 5)}
        if on_progress:
            on_progress(run.steps, run.steps, seen, wall)
        self.privacy.pop("dp", None)
        claim = run.trainer.finish()
        if claim is not None:
            self.privacy["dp"] = claim
        return self

    def _take_data(self, images, labels) -> np.ndarray:
        """Check fit's arrays, record the classes, counts and image shape; the local label of each image."""
        images, labels = np.asarray(images), np.asarray(labels, np.int64)
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels) or len(images) == 0:
            raise FedFactoryError(f"{self.client_id}: fit needs uint8 N x H x W x C images and N labels, N > 0; "
                                  f"got {images.shape} {images.dtype} and {labels.shape}")
        self.classes, counts = (v.tolist() for v in np.unique(labels, return_counts=True))
        self.counts = [int(c) for c in counts]
        self.image_shape = tuple(int(s) for s in images.shape[1:])
        return np.searchsorted(self.classes, labels)

    def _start(self, images: np.ndarray, local: np.ndarray, trainer: Trainer) -> "_Run":
        """A fresh seeded network, its EMA copy and optimizer, the data on the device and the trainer's plan."""
        cfg = self.train_cfg
        batch, steps, k = trainer.plan(self, len(images), int(cfg["batch_size"]), int(cfg["budget_images"]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.client_id, "init"))
            net = self.build_network().to(self.device)
        ema = copy.deepcopy(net).requires_grad_(False)
        opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"], betas=(0.9, 0.99), fused=self.device.type == "cuda")
        # The images stay uint8 on the device (a quarter of float32's memory), converted per batch;
        # a read-only array (torch warns on one) is copied.
        pixels = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(self.device)
        y_all = torch.from_numpy(local).to(self.device)
        gen = torch.Generator(self.device).manual_seed(derive_seed(self.seed, self.client_id, "noise"))
        train_net, opt = trainer.prepare(self, net, opt)
        batches = trainer.batches(self, len(pixels), batch, steps)
        return _Run(trainer, net, train_net, ema, opt, pixels, y_all, gen, batches, batch, steps, k,
                    warmup=max(1, int(cfg.get("warmup_images", 0)) // batch))

    def _loop(self, run: "_Run", checkpoint, checkpoint_every: int, on_progress):
        """The training steps; (images seen, running mean loss on the device or None, the loss curve)."""
        cfg, net = self.train_cfg, run.net
        ema_params, net_params = list(run.ema.parameters()), list(net.parameters())
        net.train()
        t0, seen, loss_avg = time.perf_counter(), 0, None
        curve = LossCurve(run.steps, run.batch)
        run.t0, told = t0, t0  # told: when on_progress was last called
        # disable=None: no bar when stderr is not a terminal (a log file), as the runners' bars
        bar = tqdm(range(run.steps), desc=f"{self.kind} {self.client_id}", unit="step",
                   disable=None if self.progress else True, leave=False, dynamic_ncols=True)
        for step, idx in zip(bar, run.batches):
            loss = self._step(run, step, idx, net_params)
            seen += run.batch  # with DP, images expected (a Poisson batch's size varies)
            ema_step(ema_params, net_params, run.batch, seen, cfg["ema_halflife_images"])
            if checkpoint and (step + 1) % checkpoint_every == 0:  # e.g. benchmarks/memorization.py
                checkpoint(seen, run.ema)
            if loss is not None:  # a running mean kept on the device: read (a host sync) only when the bar shows it
                loss = loss.detach().double()
                loss_avg = loss if loss_avg is None else 0.98 * loss_avg + 0.02 * loss
            curve.add(step, loss)
            # Host-side counts only, no device read: on a GPU the steps told are those queued, a bounded
            # distance ahead of the device.
            if on_progress and time.perf_counter() - told >= PROGRESS_EVERY:
                told = time.perf_counter()
                on_progress(step + 1, run.steps, seen, told - t0)
            if not bar.disable and (step % 20 == 0 or step == run.steps - 1) and loss_avg is not None:
                bar.set_postfix(loss=f"{loss_avg.item():.4f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        bar.close()
        return seen, loss_avg, curve

    def _step(self, run: "_Run", step: int, idx: torch.Tensor, net_params: list):
        """One optimizer step on the batch `idx`; its loss (None for an empty DP batch: noise alone)."""
        cfg = self.train_cfg
        x, y = to_model(run.pixels[idx]), run.y_all[idx]
        if cfg.get("hflip", False):  # flip half the batch: free data for mirror-symmetric classes
            flip = torch.rand(len(x), generator=run.gen, device=self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        for g in run.opt.param_groups:  # linear warm-up, then constant (a decay measured worse here)
            g["lr"] = cfg["lr"] * min(1.0, (step + 1) / run.warmup)
        run.opt.zero_grad(set_to_none=True)
        loss = None
        if len(x):  # a Poisson batch may be empty: its DP step is noise alone
            if run.k > 1:  # each image's k rows: k noise levels, one clipped gradient
                x, y = x.repeat_interleave(run.k, 0), y.repeat_interleave(run.k, 0)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.loss(run.train_net, x, y, run.gen)
            loss.backward()
        run.trainer.after_backward(net_params, len(idx), run.k)
        run.opt.step()
        return loss

    @torch.no_grad()
    def sample(self, class_id: int, n: int, seed: int) -> np.ndarray:
        """n uint8 images of global class `class_id`; the same seed gives the same images."""
        if self.net is None:
            raise FedFactoryError(f"{self.client_id}: module is not trained")
        if class_id not in self.classes:
            raise FedFactoryError(f"{self.client_id}: module does not cover class {class_id} (covers {self.classes})")
        local = self.classes.index(class_id)
        per_call = chunks_per_call(self.device, self.image_shape)
        chunks, out = math.ceil(n / SAMPLE_CHUNK), []
        for first in range(0, chunks, per_call):
            noise = torch.cat([torch.randn((SAMPLE_CHUNK, *self.noise_shape()), device=self.device,
                                           generator=torch.Generator(self.device).manual_seed(derive_seed(seed, "chunk", c)))
                               for c in range(first, min(first + per_call, chunks))])
            labels = torch.full((len(noise),), local, dtype=torch.long, device=self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out.append(to_uint8(self.generate(labels, noise)))
        return np.concatenate(out)[:n] if out else np.zeros((0, *self.image_shape), np.uint8)

    # -- files --------------------------------------------------------------------------
    def manifest(self) -> dict:
        return {
            "kind": self.kind, "library_version": __version__, "client_id": self.client_id,
            "arch": self.arch, "image_shape": list(self.image_shape),
            "normalisation": {"pixels": "uint8", "model_range": [-1.0, 1.0], "x_model": "x / 127.5 - 1"},
            "classes": self.classes, "counts": self.counts,
            "training": {**self.train_cfg, "seed": self.seed, "bf16": self.bf16}, "stats": self.stats,
            **({"privacy": self.privacy} if self.privacy else {}),
            **({"site": self.site} if self.site else {}),
        }

    def save(self, path: str | Path) -> dict:
        """Write the module folder atomically; returns the manifest with the weights' SHA-256."""
        self.saved_manifest = write_module_dir(path, *self.to_bytes())
        return self.saved_manifest

    def to_bytes(self) -> tuple[bytes, dict]:
        """The module as it travels: safetensors bytes and the manifest (with their SHA-256)."""
        if self.net is None:
            raise FedFactoryError(f"{self.client_id}: cannot serialize an untrained module")
        return serialize(self.net.state_dict(), self.manifest())

    @classmethod
    def from_manifest(cls, manifest: dict, device: str = "auto", bf16: str = "auto") -> "GenerativeModule":
        m = cls(manifest["arch"], {k: v for k, v in manifest.get("training", {}).items() if k in cls.presets["cpu"]["train"]},
                client_id=str(manifest.get("client_id", "client")), seed=manifest.get("training", {}).get("seed", 0),
                device=device, bf16=bf16)
        m.classes = [int(c) for c in manifest["classes"]]
        m.counts = [int(c) for c in manifest["counts"]]
        m.image_shape = tuple(int(s) for s in manifest["image_shape"])
        m.stats = manifest.get("stats", {})
        m.privacy = manifest.get("privacy", {})
        m.site = manifest.get("site", {}) if isinstance(manifest.get("site"), dict) else {}
        return m
