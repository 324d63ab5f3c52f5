"""Resident memory of a process tree, sampled while a run goes on: what a multi-process run really costs.

The calling process's own RSS (``ru_maxrss``) does not show a SuperLink, its ServerApp, Ray and the ClientApps;
this sums ``VmRSS`` over a tree found by PID, twice a second, and keeps the peak.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mlip_fed.process_tree import descendants


def tree_rss_bytes(roots: Iterable[int]) -> int:
    """Summed ``VmRSS`` of each root and all its descendants, from /proc (a process that ends meanwhile counts 0)."""
    total = 0
    for root in roots:
        for pid in [root, *descendants(root)]:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                continue
    return total


class PeakRss:
    """The largest sample seen so far, in bytes (0 until the first sample)."""

    def __init__(self) -> None:
        self.bytes = 0


@contextmanager
def peak_tree_rss(roots: Callable[[], Iterable[int]], every_s: float = 0.5) -> Iterator[PeakRss]:
    """Sample ``tree_rss_bytes(roots())`` every ``every_s`` in a thread for the duration of the ``with`` block.

    ``roots`` is called at each sample, because the tree's root may start after the block is entered.
    """
    peak = PeakRss()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every_s):
            peak.bytes = max(peak.bytes, tree_rss_bytes(roots()))

    thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()
