"""Timing helpers shared by the benchmarks: medians, and ratios of back-to-back pairs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def synchronizer(device) -> Callable[[], None]:
    """What makes a timer see the end of the work queued on ``device`` (CUDA is asynchronous)."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_ratio(fn, baseline, repeats: int) -> tuple[float, float]:
    """Median of time(fn) / time(baseline) over back-to-back pairs, and baseline's median
    time. Pairing cancels most of the drift of a shared, noisy machine."""
    fn()
    baseline()  # warm-up: cached block layouts and masks, compilation
    ratios, base = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        baseline()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
        base.append(t1 - t0)
    return statistics.median(ratios), statistics.median(base)
