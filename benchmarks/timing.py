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


def profile_table(function, device: torch.device, calls: int = 3, rows: int = 25) -> str:
    """torch.profiler's table of the `rows` operators that took the most device time (CPU time without
    CUDA) over `calls` calls of `function`, warm-up already done by the caller: where a step's time goes."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(calls):
            function()
        if device.type == "cuda":
            torch.cuda.synchronize()
    averages = profiler.key_averages()
    if device.type != "cuda":
        return averages.table(sort_by="self_cpu_time_total", row_limit=rows)
    try:  # newer torch names the column after the device, older after CUDA
        return averages.table(sort_by="self_device_time_total", row_limit=rows)
    except (AttributeError, KeyError, ValueError):
        return averages.table(sort_by="self_cuda_time_total", row_limit=rows)
