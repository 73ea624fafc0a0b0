"""The generative module: what a client trains on its own data and uploads once.

Shape of the API (scikit-learn-like, plain arrays in and out):

    module = DiffusionModule(arch, train, client_id="client-3", seed=0).fit(images, labels)
    images = module.sample(class_id=3, n=1000, seed=42)      # uint8 N x H x W x C
    module.save("modules/client-3"); module = load_module("modules/client-3")

A client with several classes trains ONE class-conditional network over them. Subclasses
define the network, the loss and the sampler; this file holds what they share: the seeded
training loop (batches, EMA, bf16), chunked seeded sampling, and the module file format.
"""

from __future__ import annotations

import copy
import math
import secrets
import time
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..errors import FedFactoryError
from ..utils import derive_seed, ema_step
from .fileformat import read_manifest, read_weights, serialize, write_module_dir

# Images are generated in fixed chunks, each with its own noise stream: asking for n images
# always gives the first n of the same sequence, whatever n is (what makes synthesis exact).
SAMPLE_CHUNK = 100
# A GPU samples several chunks per network call (about this many pixels), a CPU one: small
# calls are launch-bound on a large GPU, and on a CPU one chunk keeps the shipped bits.
GPU_SAMPLE_PIXELS = 1 << 21
# Batch indices are drawn on the host this many steps at a time and copied once per block.
INDEX_BLOCK = 512
# fit's on_progress is called at most this often (seconds): enough for a display, a negligible cost.
PROGRESS_EVERY = 1.0


def to_model(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x C (on any device) -> float N x C x H x W in [-1, 1]."""
    return pixels.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x C array -> float N x C x H x W tensor in [-1, 1]."""
    return to_model(torch.from_numpy(np.require(images, requirements=["C", "W"])))


def chunks_per_call(device: torch.device, image_shape: tuple[int, int, int]) -> int:
    h, w, _ = image_shape
    return max(1, GPU_SAMPLE_PIXELS // (SAMPLE_CHUNK * h * w)) if device.type == "cuda" else 1


def index_blocks(rng: np.random.Generator, high: int, batch: int, steps: int, device: torch.device):
    """Per-step batch indices (uniform with replacement), copied to the device a block at a time:
    the same numbers as one `rng.integers(0, high, batch)` per step, without a copy per step."""
    for first in range(0, steps, INDEX_BLOCK):
        yield from torch.from_numpy(rng.integers(0, high, (min(INDEX_BLOCK, steps - first), batch))).to(device)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return x.float().add(1.0).mul(127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise FedFactoryError("runtime.device is cuda but no CUDA GPU is available")
    return torch.device(name)


def use_bf16(device: torch.device, setting: str = "auto") -> bool:
    """bf16 autocast: on GPUs and on CPUs with AMX/AVX512-BF16 (measured 1.6-2.5x faster here)."""
    if setting != "auto":
        return setting == "on"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # native bf16 units only: elsewhere bf16 is emulated and slower than fp32
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


class GenerativeModule(ABC):
    kind: str = ""
    # Per-kind defaults: `arch` (network shape), `train` (budget, batch, lr, ...) and optionally
    # `dp_train`, the `train` values that replace them under DP-SGD (a key the config sets wins).
    presets: dict[str, dict] = {}
    # `train` keys that only decide how a trained network is sampled: changing them needs no retraining.
    sampling_keys: tuple[str, ...] = ()

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
            on_progress=None) -> "GenerativeModule":
        """Train from scratch on one client's images (uint8 N x H x W x C) and labels; with `dp`
        set, by DP-SGD (privacy/dp.py), and the spent budget goes to `privacy["dp"]`.
        `checkpoint(images_seen, ema_network)` is called every `checkpoint_every` steps;
        `on_progress(steps_done, steps, images_seen, seconds)` about once a second and once at the end."""
        images, labels = np.asarray(images), np.asarray(labels, np.int64)
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels) or len(images) == 0:
            raise FedFactoryError(f"{self.client_id}: fit needs uint8 N x H x W x C images and N labels, N > 0; "
                                  f"got {images.shape} {images.dtype} and {labels.shape}")
        self.classes, counts = (v.tolist() for v in np.unique(labels, return_counts=True))
        self.counts = [int(c) for c in counts]
        self.image_shape = tuple(int(s) for s in images.shape[1:])
        local = np.searchsorted(self.classes, labels)
        cfg = self.train_cfg
        batch, budget = int(cfg["batch_size"]), int(cfg["budget_images"])
        steps, k = max(1, math.ceil(budget / batch)), 1
        if self.dp is not None:
            from ..privacy import dp as dpsgd

            dp = dpsgd.plan(self.dp, len(images), batch, budget)
            batch, steps, k = dp["batch"], dp["steps"], dp["noise_multiplicity"]

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.client_id, "init"))
            net = self.build_network().to(self.device)
        ema = copy.deepcopy(net).requires_grad_(False)
        cuda = self.device.type == "cuda"
        opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"], betas=(0.9, 0.99), fused=cuda)
        # The images stay uint8 on the device (a quarter of float32's memory), converted per batch;
        # a read-only array (torch warns on one) is copied.
        pixels = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(self.device)
        y_all = torch.from_numpy(local).to(self.device)
        gen = torch.Generator(self.device).manual_seed(derive_seed(self.seed, self.client_id, "noise"))
        if self.dp is None:
            train_net = torch.compile(net) if self.compile and cuda else net
            batches = index_blocks(np.random.default_rng(derive_seed(self.seed, self.client_id, "batches")),
                                   len(pixels), batch, steps, self.device)
        else:  # per-sample gradient hooks on net's layers (so not compiled), clipped and noised steps, Poisson
            # batches. bf16 autocast stays (faster here); the per-image gradients are clipped in fp32.
            # The noise and the batches must be secret for epsilon to hold: they are drawn from a seed that
            # no one else knows (the operating system's), never from the run seed in the manifest.
            secret = self.dp.get("secret_seed") or secrets.randbits(63)  # secret_seed: tests only
            dp_noise = torch.Generator(self.device).manual_seed(derive_seed(secret, "dp-noise"))
            hooks, opt = dpsgd.make_private(net, opt, dp, dp_noise)
            train_net = net  # not the wrapper: a kind's loss may call the network's own methods (cvae)
            batches = dpsgd.poisson_batches(np.random.default_rng(derive_seed(secret, "dp-batches")),
                                            len(pixels), dp["sample_rate"], steps, self.device)
        warmup = max(1, int(cfg.get("warmup_images", 0)) // batch)
        ema_params, net_params = list(ema.parameters()), list(net.parameters())

        net.train()
        t0, seen, loss_avg = time.perf_counter(), 0, None
        told = t0  # when on_progress was last called
        # disable=None: no bar when stderr is not a terminal (a log file), as the runners' bars
        bar = tqdm(range(steps), desc=f"{self.kind} {self.client_id}", unit="step",
                   disable=None if self.progress else True, leave=False, dynamic_ncols=True)
        for step, idx in zip(bar, batches):
            x, y = to_model(pixels[idx]), y_all[idx]
            if cfg.get("hflip", False):  # flip half the batch: free data for mirror-symmetric classes
                flip = torch.rand(len(x), generator=gen, device=self.device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            for g in opt.param_groups:  # linear warm-up, then constant (a decay measured worse here)
                g["lr"] = cfg["lr"] * min(1.0, (step + 1) / warmup)
            opt.zero_grad(set_to_none=True)
            loss = None
            if len(x):  # a Poisson batch may be empty: its DP step is noise alone
                if k > 1:  # each image's k rows: k noise levels, one clipped gradient
                    x, y = x.repeat_interleave(k, 0), y.repeat_interleave(k, 0)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    loss = self.loss(train_net, x, y, gen)
                loss.backward()
            if self.dp is not None:
                dpsgd.per_image_grads(net_params, len(idx), k)
            opt.step()
            seen += batch  # with DP, images expected (a Poisson batch's size varies)
            ema_step(ema_params, net_params, batch, seen, cfg["ema_halflife_images"])
            if checkpoint and (step + 1) % checkpoint_every == 0:  # e.g. benchmarks/memorization.py
                checkpoint(seen, ema)
            if loss is not None:  # a running mean kept on the device: read (a host sync) only when the bar shows it
                loss = loss.detach().double()
                loss_avg = loss if loss_avg is None else 0.98 * loss_avg + 0.02 * loss
            # Host-side counts only, no device read: on a GPU the steps told are those queued, a bounded
            # distance ahead of the device.
            if on_progress and time.perf_counter() - told >= PROGRESS_EVERY:
                told = time.perf_counter()
                on_progress(step + 1, steps, seen, told - t0)
            if not bar.disable and (step % 20 == 0 or step == steps - 1) and loss_avg is not None:
                bar.set_postfix(loss=f"{loss_avg.item():.4f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        bar.close()
        for be, b in zip(ema.buffers(), net.buffers()):
            be.copy_(b)
        self.net = ema.eval()
        # Reading the loss waits for the device's queued work, so the wall time below is true.
        final_loss = float("nan") if loss_avg is None else float(loss_avg)
        wall = time.perf_counter() - t0
        self.stats = {"train_seconds": round(wall, 2), "train_images_per_s": round(seen / wall, 1),
                      "images_seen": seen, "final_loss": round(final_loss, 5)}
        if on_progress:
            on_progress(steps, steps, seen, wall)
        self.privacy.pop("dp", None)
        if self.dp is not None:
            hooks.remove_hooks()
            self.privacy["dp"] = dpsgd.claim(dp)
        return self

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


def module_kinds() -> dict[str, type[GenerativeModule]]:
    from .cvae import CVAEModule
    from .diffusion import DiffusionModule

    return {DiffusionModule.kind: DiffusionModule, CVAEModule.kind: CVAEModule}


def load_module(path: str | Path, device: str = "auto", bf16: str = "auto", limits=None) -> GenerativeModule:
    """Load and verify a module folder; a bad one raises ModuleFileError naming the file and why.

    Everything the manifest declares is checked against `limits` (modules/limits.py) before any
    tensor is built or the weights are read.
    """
    from .fileformat import ModuleFileError
    from ..privacy import check_privacy_block
    from .limits import Limits, check_declared, check_parameters

    limits = limits or Limits()
    where = str(Path(path) / "manifest.json")
    manifest = read_manifest(path)
    kinds = module_kinds()
    if not isinstance(manifest["kind"], str) or manifest["kind"] not in kinds:
        raise ModuleFileError(f"{where}: unknown module kind {str(manifest['kind'])[:40]!r}")
    cls = kinds[manifest["kind"]]
    check_declared(manifest, cls.presets["cpu"]["arch"], limits, where)
    check_privacy_block(manifest, where)
    try:
        module = cls.from_manifest(manifest, device=device, bf16=bf16)
        check_parameters(module, limits, where)
        with torch.random.fork_rng(devices=[]):
            net = module.build_network()
    except (KeyError, TypeError, ValueError, RuntimeError, FedFactoryError) as e:
        if isinstance(e, ModuleFileError):
            raise
        raise ModuleFileError(f"{where}: cannot build the declared architecture: {str(e)[:200]}") from None
    state = read_weights(path, manifest, net.state_dict(), max_bytes=limits.max_module_bytes)
    net.load_state_dict(state)
    module.net = net.to(module.device).eval().requires_grad_(False)
    module.saved_manifest = manifest
    return module
