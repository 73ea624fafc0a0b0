"""Classifier training (seeded, class-balanced batches, cosine schedule) and prediction."""

from __future__ import annotations

import copy
import json
import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from ..errors import FedFactoryError
from ..tensors import INDEX_BLOCK, to_float, to_model
from ..utils import LossCurve, derive_seed, ema_step
from .augment import augment
from .registry import build_network

if TYPE_CHECKING:  # annotations only: the config imports this package's registry
    from ..config import ClassifierConfig


def build_classifier(in_channels: int, num_classes: int, preset: str = "cpu", width: int = 0) -> torch.nn.Module:
    """The network `classifier.preset` names (classify/registry.py), untrained."""
    return build_network(preset, in_channels, num_classes, width)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy through gather: F.cross_entropy's CUDA kernels accumulate with atomics
    (no deterministic mode); this gives the same bits on CPU and is deterministic on a GPU.
    smoothing: the target puts that much mass uniformly over all classes (label smoothing)."""
    logp = F.log_softmax(logits.float(), dim=1)
    nll = -logp.gather(1, labels[:, None]).mean()
    return nll if smoothing == 0 else (1 - smoothing) * nll - smoothing * logp.mean()


def _optimizer(net: torch.nn.Module, cfg: ClassifierConfig, steps: int, device: torch.device):
    """SGD (Nesterov) or AdamW, and a linear warm-up into a cosine decay over `steps`."""
    fused = device.type == "cuda"  # one kernel for all parameters on a GPU; the CPU keeps its loop (and bits)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                              weight_decay=cfg.weight_decay, fused=fused)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    warmup = max(1, steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return opt, sched


def _balanced_batches(labels: np.ndarray, num_classes: int, rng: np.random.Generator, steps: int, batch: int,
                      device: torch.device):
    """Class-balanced sampling: every class is drawn equally often whatever its share. Indices are
    drawn a block of steps at a time and copied to the device once per block."""
    counts = np.bincount(labels, minlength=num_classes)
    cdf = np.cumsum(1.0 / counts[labels])
    cdf /= cdf[-1]
    for first in range(0, steps, INDEX_BLOCK):
        u = rng.random((min(INDEX_BLOCK, steps - first), batch))
        yield from torch.from_numpy(np.minimum(np.searchsorted(cdf, u), len(cdf) - 1)).to(device)


def _ema_copy(net: torch.nn.Module, halflife: float):
    """(EMA network, its tensors, net's tensors), or Nones without a half-life: the weights and the
    BatchNorm statistics, averaged alike."""
    if halflife <= 0:
        return None, None, None
    ema = copy.deepcopy(net).requires_grad_(False)
    return (ema, [*ema.parameters(), *(b for b in ema.buffers() if b.is_floating_point())],
            [*net.parameters(), *(b for b in net.buffers() if b.is_floating_point())])


def _mixed_loss(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lam: float, smoothing: float,
                device_type: str, bf16: bool) -> torch.Tensor:
    """The batch's loss; with lam < 1 (mixup), each image blended with the batch's reversed order, and the loss with it."""
    if lam < 1.0:  # written in x's own strides: augment's are channels-last, whose convolutions run ~1.4x faster here
        x = torch.add(lam * x, (1 - lam) * x.flip(0), out=torch.empty_like(x))
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        logits = net(x)
        loss = cross_entropy(logits, y, smoothing)
        if lam < 1.0:
            loss = lam * loss + (1 - lam) * cross_entropy(logits, y.flip(0), smoothing)
    return loss


# many parameters because the runtime's settings (augment policy, device, bf16, progress) come as keywords
# beside the data and the recipe, as runtime.classifier_kw gives them to every caller
def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, cfg: ClassifierConfig, seed: int, name: str,
                     augment_policy: str = "natural", device: torch.device | str = "cpu", bf16: bool = False,
                     progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """Train from scratch for cfg.budget_images images; batches are drawn class-balanced.
    Optional (cfg): label smoothing, mixup (Beta(a, a) weights), an EMA of the weights and BatchNorm
    statistics (half-life in images), which is the network returned.

    Returns the network (in eval mode) and its training stats; stats["curve"] is the loss every few
    steps (utils.LossCurve: 100 to 200 points of {"step", "images_seen", "loss"}).
    """
    if len(images) == 0:
        raise FedFactoryError(f"classifier {name}: no training images")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "classifier", name, "init"))
        net = build_classifier(images.shape[-1], num_classes, cfg.preset, cfg.width).to(device)
    batch = int(cfg.batch_size)
    steps = max(1, math.ceil(cfg.budget_images / batch))
    opt, sched = _optimizer(net, cfg, steps, device)
    rng = np.random.default_rng(derive_seed(seed, "classifier", name, "batches"))
    gen = torch.Generator(device).manual_seed(derive_seed(seed, "classifier", name, "augment"))
    smoothing, mixup = float(cfg.label_smoothing), float(cfg.mixup)
    mix_rng = np.random.default_rng(derive_seed(seed, "classifier", name, "mixup"))
    halflife = float(cfg.ema_halflife_images)
    ema, ema_tensors, net_tensors = _ema_copy(net, halflife)
    # uint8 on the device, converted per batch (a read-only array copied: torch warns on one)
    pixels = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(device)
    y_all = torch.from_numpy(np.asarray(labels, np.int64)).to(device)

    net.train()
    t0, loss_avg, curve = time.perf_counter(), None, LossCurve(steps, batch)
    bar = tqdm(range(steps), desc=f"classifier {name}", unit="step", disable=None if progress else True, leave=False, dynamic_ncols=True)
    for step, idx in zip(bar, _balanced_batches(labels, num_classes, rng, steps, batch, device)):
        x, y = augment(to_model(pixels[idx]), augment_policy, gen, cfg.blur), y_all[idx]
        lam = float(mix_rng.beta(mixup, mixup)) if mixup > 0 else 1.0
        loss = _mixed_loss(net, x, y, lam, smoothing, device.type, bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema_step(ema_tensors, net_tensors, batch, (step + 1) * batch, halflife)
        loss = loss.detach().double()  # a running mean on the device: read (a host sync) only for the bar
        loss_avg = loss if loss_avg is None else 0.98 * loss_avg + 0.02 * loss
        curve.add(step, loss)
        if not bar.disable and step % 20 == 0:
            bar.set_postfix(loss=f"{loss_avg.item():.3f}", refresh=False)
    bar.close()
    final_loss, points = curve.read(loss_avg)  # waits for the device's queued work, so the wall time below is true
    wall = time.perf_counter() - t0
    return (ema if ema is not None else net).eval(), {
        "train_seconds": round(wall, 2), "images_seen": steps * batch,
        "images_per_s": round(steps * batch / wall, 1), "final_loss": round(final_loss, 4),
        "curve": points}  # the loss every few steps: a runner moves it to curves.csv


@torch.no_grad()
def predict_log_proba(net: torch.nn.Module, images: np.ndarray, device="cpu", bf16: bool = False,
                      batch: int = 500) -> np.ndarray:
    net.eval()
    out = []
    for i in range(0, len(images), batch):
        x = to_float(images[i : i + batch]).to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            out.append(F.log_softmax(net(x).float(), dim=1).double().cpu().numpy())
    return np.concatenate(out)


def product_of_experts(log_probas: list[np.ndarray]) -> np.ndarray:
    """Sum the experts' log-softmax outputs and renormalise: argmax is the PoE prediction."""
    s = np.sum(log_probas, axis=0)
    return s - np.logaddexp.reduce(s, axis=1, keepdims=True)


def classifier_to_bytes(net: torch.nn.Module, name: str) -> bytes:
    """A trained classifier as safetensors bytes; its name (the site's client id) rides in the metadata
    (one key: safetensors writes several in no fixed order, and the bytes must be reproducible)."""
    return save_safetensors({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
                            metadata={"fedfactory-classifier": name})


def classifier_from_bytes(blob: bytes, in_channels: int, num_classes: int, cfg: ClassifierConfig) -> tuple[torch.nn.Module, str]:
    """The network and name of classifier bytes; refuses anything that is not this run's architecture."""
    try:
        n = int.from_bytes(blob[:8], "little")
        if len(blob) < 8 or n > len(blob) - 8:
            raise ValueError("truncated header")
        meta = json.loads(blob[8 : 8 + n]).get("__metadata__") or {}
        net = build_classifier(in_channels, num_classes, cfg.preset, cfg.width)
        net.load_state_dict(load_safetensors(blob))
    except (SafetensorError, ValueError, RuntimeError, UnicodeDecodeError, AttributeError) as e:
        raise FedFactoryError(f"not a classifier of this run's architecture: {str(e).splitlines()[0][:200]}") from None
    return net.eval(), str(meta.get("fedfactory-classifier", ""))
