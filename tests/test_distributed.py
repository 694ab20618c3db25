"""A two-process CPU run under `accelerate launch` (gloo) agrees with one process on the same data."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "distributed" / "codebook_two_process.py"
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str], tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(command + [str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists():
        pytest.skip("the accelerate launcher is not installed")
    tmp_path = tmp_path_factory.mktemp("dist")
    launcher = str(Path(sys.executable).parent / "accelerate") if (Path(sys.executable).parent / "accelerate").exists() else "accelerate"
    run([sys.executable], tmp_path)
    # `--multi_gpu` selects the torch.distributed launcher; with no GPU, tokgen asks for CPU processes (gloo).
    run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(free_port())], tmp_path)
    return [json.loads((tmp_path / f"result_{n}.json").read_text()) for n in (1, 2)]


def test_two_processes_report_the_same_codebook_metrics(results):
    one, two = results
    assert two["num_processes"] == 2
    for key in ("usage", "perplexity", "dead_codes"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5), key


def test_two_processes_update_the_codebook_as_one(results):
    one, two = results
    flat_one = [x for row in one["codebook"] for x in row]
    flat_two = [x for row in two["codebook"] for x in row]
    assert flat_two == pytest.approx(flat_one, rel=1e-4, abs=1e-5)


def test_ranks_keep_identical_codebooks_while_training(results):
    _, two = results
    rank0, rank1 = two["training_codebooks"]
    assert rank0 == rank1


def test_decoder_only_training_runs_data_parallel_with_the_encoder_frozen(results):
    one, two = results
    rank0, rank1 = two["decoder_only"]["decoders"]
    assert rank0 == rank1
    assert one["decoder_only"]["encoder_kept"] and two["decoder_only"]["encoder_kept"]
