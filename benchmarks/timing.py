"""The side-by-side timer every benchmark here uses: the functions alternate call by call, so that machine noise
(other processes, frequency changes) hits all of them alike, and medians are reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def race(fns: dict[str, Callable[[], object]], warmup: int, reps: int) -> dict[str, tuple[float, float]]:
    """(median wall seconds, median process CPU seconds) per call of each function, calls alternating across them;
    the first `warmup` rounds are not timed."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if rep >= warmup:
                times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return {name: (statistics.median(t for t, _ in ts), statistics.median(c for _, c in ts))
            for name, ts in times.items()}
