"""Progress that tells the truth while sites train in parallel processes: the workers report
(client, steps done, steps, images seen, seconds) on a queue, and this shows a line per client in
training and the phase's ETA."""

from __future__ import annotations

import heapq
import queue
import time

from tqdm.auto import tqdm


class ClientProgress:
    """The parallel path's display: a bar per client in training (steps, img/s, its ETA), fed by the
    workers' news, and the ETA of the phase's training on the clients bar."""

    def __init__(self, bar: tqdm, news, clients: int, workers: int):
        self.bar, self.news, self.clients, self.workers = bar, news, clients, workers
        self.state, self.bars = {}, {}  # client -> latest (step, steps, seconds); client -> its bar
        bar.bar_format = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"  # tqdm's own ETA: clients/s, useless here

    def poll(self, timeout: float = 0.5) -> None:
        """Show the news that arrives within `timeout` seconds."""
        try:
            item = self.news.get(timeout=timeout)
            while True:
                self.show(*item)
                item = self.news.get_nowait()
        except queue.Empty:
            pass
        eta = self.eta()
        if eta is not None:
            self.bar.set_postfix_str(f"ETA {tqdm.format_interval(eta)}")

    def show(self, cid: str, step: int, steps: int, seen: int, seconds: float) -> None:
        self.state[cid] = (step, steps, seconds)
        b = self.bars.get(cid)
        if b is None and step < steps:  # tqdm places it on the first free line below the clients bar
            b = self.bars[cid] = tqdm(total=steps, desc=f"  {cid}", unit="step", leave=False, dynamic_ncols=True)
        if b is None:
            return
        if step >= steps:  # trained (its audit and upload follow): its line goes
            b.close()
            return
        # the worker's clock, not the bar's: tqdm's rate (steps/s) and ETA are then step / seconds
        b.n, b.start_t = step, time.time() - seconds
        b.set_postfix_str(f"{seen / max(seconds, 1e-9):.0f} img/s")

    def eta(self) -> float | None:
        """Seconds of training left: the running clients' own ETAs, then each client not heard from yet
        taking as long as the mean client so far, on the first worker free."""
        if not self.state:
            return None
        totals = [steps * sec / max(step, 1) for step, steps, sec in self.state.values()]
        free = sorted(t - sec for t, (step, steps, sec) in zip(totals, self.state.values()) if step < steps)
        free = free[:self.workers] + [0.0] * max(0, self.workers - len(free))
        heapq.heapify(free)
        for _ in range(self.clients - len(self.state)):
            heapq.heapreplace(free, free[0] + sum(totals) / len(totals))
        return max(free)

    def close(self) -> None:
        for b in self.bars.values():
            b.close()
