"""The glibc allocator setting that keeps the CPU code search out of system calls (pipelines/cpu_memory.py)."""

import json
import platform
import subprocess
import sys

import pytest

from pipelines import cpu_memory

on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.fixture
def glibc_defaults(monkeypatch):
    """No allocator setting of the user's in the environment, so `keep_freed_memory` makes its own."""
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.skipif(not on_glibc, reason="mallopt is glibc's")
def test_the_thresholds_are_ones_glibc_accepts(glibc_defaults):
    # run in a fresh process, so this test's settings do not outlive it
    code = "from pipelines.cpu_memory import keep_freed_memory; print(keep_freed_memory())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"


def test_a_users_own_allocator_setting_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert cpu_memory.keep_freed_memory() is False


def test_the_memory_benchmark_times_each_setting_in_its_own_process(tmp_path, glibc_defaults):
    from benchmarks.bench_code_search_memory import main
    from helpers.tiny_audio import tiny_config
    from tokenizers_vq.audio import AudioVQVAE

    AudioVQVAE(tiny_config()).save_pretrained(tmp_path / "tokenizer")
    main([str(tmp_path / "tokenizer"), "--windows", "4", "--batch-sizes", "2", "--out", str(tmp_path / "m.json")])
    settings = json.loads((tmp_path / "m.json").read_text())["settings"]
    assert [(s["batch_size"], s["keep_freed_memory"]) for s in settings] == [(2, False), (2, True)]
    assert [s["setting_took"] for s in settings] == [False, on_glibc]
    assert all(s["windows"] == 4 and s["wall_seconds"] > 0 and s["user_seconds"] >= 0 for s in settings)
