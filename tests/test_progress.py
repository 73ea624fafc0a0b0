"""Progress that tells the truth: fit reports its steps, the parallel clients each get a bar and the
phase an ETA, on a terminal only, and none of it changes a bit."""

import io
import queue
import sys

import numpy as np
import pytest
import torch
from tqdm.auto import tqdm

from fedfactory.config import load_config
from fedfactory.modules import base
from fedfactory.runners import embedded
from fedfactory.progress import ClientProgress
from fedfactory.runners.embedded import prepare_data, train_modules
from helpers import TINY_CLASSIFIER, tiny, toy_overrides


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("kind", ["diffusion", "cvae"])
def test_fit_tells_its_progress_and_keeps_every_bit(kind, monkeypatch, device_reads):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (40, 12, 12, 1), dtype=np.uint8), np.array([0, 1] * 20)
    plain = tiny(kind).fit(x, y)
    reads = len(device_reads)
    monkeypatch.setattr(base, "PROGRESS_EVERY", 0.0)  # news after every step
    news = []
    told = tiny(kind).fit(x, y, on_progress=lambda *a: news.append(a))
    assert len(device_reads) == 2 * reads  # the news costs no read from the device
    steps = 64 // 16
    assert [n[0] for n in news] == [1, 2, 3, 4, 4] and all(n[1] == steps for n in news)
    assert [n[2] for n in news] == [16, 32, 48, 64, 64]
    assert all(a[3] <= b[3] for a, b in zip(news, news[1:]))  # seconds go forward
    sa, sb = plain.net.state_dict(), told.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert told.stats["images_seen"] == plain.stats["images_seen"]


def test_client_bars_and_phase_eta(monkeypatch):
    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    bar = tqdm(total=3, desc="client modules", disable=None)
    news = queue.Queue()
    view = ClientProgress(bar, news, clients=3, workers=2)
    news.put(("client-0", 10, 100, 320, 2.0))
    news.put(("client-1", 20, 100, 640, 2.0))
    view.poll(timeout=0.01)
    assert {c: b.n for c, b in view.bars.items()} == {"client-0": 10, "client-1": 20}
    # client-0: 18 s left, client-1: 8 s, then the third client (15 s, the mean) on client-1's worker
    assert view.eta() == pytest.approx(23.0)
    out = tty.getvalue()
    assert "client-0" in out and "160 img/s" in out and "10/100" in out and "ETA 00:23" in out
    news.put(("client-1", 100, 100, 3200, 10.0))  # trained: its bar goes
    view.poll(timeout=0.01)
    assert view.bars["client-1"].disable and not view.bars["client-0"].disable
    assert view.eta() == pytest.approx(18.0)  # the third client now has a worker free
    view.close()
    bar.close()


def toy(npz, tmp_path, *more):
    cfg = load_config("configs/fashion-silos.toml", toy_overrides(npz, clients=2) + [
        "module.budget_images=256", "runtime.threads=1", "runtime.parallel_clients=2", "runtime.progress=true", *more])
    ds, part = prepare_data(cfg)
    return cfg, ds, part


@pytest.mark.slow
@pytest.mark.parametrize("terminal", [True, False])
def test_parallel_training_reports_each_client_on_a_terminal_only(digits_npz, tmp_path, monkeypatch, terminal):
    err = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    heard, show = [], ClientProgress.show
    monkeypatch.setattr(ClientProgress, "show", lambda self, *a: (heard.append(a), show(self, *a)))
    cfg, ds, part = toy(digits_npz, tmp_path)
    modules = train_modules(cfg, ds, part, tmp_path, resume=False)
    assert [m.client_id for m in modules] == ["client-0", "client-1"]
    if terminal:  # each client's last news: all its steps
        assert {(h[0], h[1]) for h in heard if h[1] == h[2]} == {("client-0", 8), ("client-1", 8)}
        assert "client modules" in err.getvalue()
    else:
        assert heard == [] and err.getvalue() == ""


@pytest.mark.parametrize("terminal", [True, False])
def test_the_classifier_and_synthesis_bars_show_on_a_terminal_only(monkeypatch, terminal):
    from fedfactory.classify import train_classifier
    from fedfactory.factory import synthesize

    err = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (40, 12, 12, 1), dtype=np.uint8), np.array([0, 1] * 20)
    train_classifier(x, y, 2, TINY_CLASSIFIER, 0, "t", progress=True)
    synthesize([tiny("diffusion").fit(x, y)], 2, 4, seed=0, progress=True)
    shown = err.getvalue()
    if terminal:
        assert "classifier t" in shown and "synthesis" in shown
    else:  # a log file or a pipe gets no carriage-return bars
        assert shown == ""


@pytest.mark.slow
def test_a_workers_error_still_surfaces_with_the_display(digits_npz, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    cfg, ds, part = toy(digits_npz, tmp_path)
    cfg = cfg.replace({"data.name": f"npz:{tmp_path / 'gone.npz'}"})  # the workers load their data from the config
    with pytest.raises(Exception, match="gone.npz"):
        embedded.train_modules(cfg, ds, part, tmp_path, resume=False)


@pytest.mark.parametrize("cores,memory_gb,sites,setting,device,expected", [
    (2, 24, 10, 0, "cpu", (2, 1)),      # this machine: two sites at a time, one thread each
    (4, 24, 2, 0, "cpu", (2, 2)),       # fewer sites than cores: the cores are shared out
    (64, 256, 10, 0, "cpu", (10, 6)),   # one process per site
    (64, 8, 10, 0, "cpu", (3, 21)),     # as many as the memory holds (2.5 GB each)
    (8, 24, 10, 3, "cpu", (3, 2)),      # runtime.parallel_clients, when set, is obeyed
    (16, 128, 10, 0, "cuda", (1, 16)),  # one GPU: one site at a time
])
def test_the_automatic_split_of_sites_over_processes_and_threads(monkeypatch, cores, memory_gb, sites, setting,
                                                                  device, expected):
    from fedfactory import runtime

    monkeypatch.setattr(runtime, "DEFAULT_THREADS", cores)
    monkeypatch.setattr(runtime, "available_memory", lambda: memory_gb * 2**30)
    monkeypatch.setattr(runtime, "resolve_device", lambda name: torch.device(device))
    cfg = load_config(None, [f"runtime.parallel_clients={setting}", f"runtime.device={device}"])
    assert runtime.site_split(cfg, sites) == expected
    cfg = cfg.replace({"runtime.threads": 1})  # set: each process's own (a site reproducing its module's bits)
    assert runtime.site_split(cfg, sites)[1] == 1
