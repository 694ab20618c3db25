"""The glibc allocator setting that keeps the CPU code search out of system calls (pipelines/cpu_memory.py)."""

import platform
import subprocess
import sys

import pytest

from pipelines import cpu_memory

on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not on_glibc, reason="mallopt is glibc's")
def test_the_thresholds_are_ones_glibc_accepts(monkeypatch):
    # run in a fresh process, so this test's settings do not outlive it
    code = "from pipelines.cpu_memory import keep_freed_memory; print(keep_freed_memory())"
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"


def test_a_users_own_allocator_setting_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert cpu_memory.keep_freed_memory() is False
