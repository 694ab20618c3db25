"""Timing shared by the benchmarks: median over repeats, after warm-up, with device syncs."""

from __future__ import annotations

import statistics
import time

import torch


def measure(function, device: torch.device, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds of `function()` over `repeats` runs.

    `warmup` runs come first (compilation, CUDA graphs, allocator). On CUDA the clock stops only
    after a synchronize. On a shared CPU the wall time includes waiting for a core; the CPU time
    does not (with one torch thread it is the call's compute time).
    """
    for _ in range(warmup):
        function()
    wall, cpu = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return statistics.median(wall), statistics.median(cpu)


def timed(function, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of `function()` (see `measure`)."""
    return measure(function, device, repeats, warmup)[0]
