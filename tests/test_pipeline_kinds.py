"""`tokgen run` accepts every tokenizer family unchanged: LFQ, VQ-GAN, and raw pixels with a baseline prior."""

import json
from pathlib import Path

import pytest

from pipelines.cli import main

SMOKE_DIR = Path(__file__).resolve().parents[1] / "configs" / "smoke"


@pytest.mark.parametrize("name", ["tiny_lfq", "tiny_vqgan", "tiny_pixels_nade"])
def test_pipeline_runs_end_to_end(name, tmp_path):
    assert main(["run", str(SMOKE_DIR / f"{name}.toml"), f"output_dir={tmp_path}"]) == 0
    run_dir = tmp_path / name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    manifest = json.loads((run_dir / "tokens" / "manifest.json").read_text())
    assert metrics["prior"]["bits_per_token"] > 0
    assert 0 <= metrics["samples"]["class_accuracy"] <= 1
    assert (run_dir / "samples" / "grid.png").is_file()
    assert manifest["tokenizer_kind"] == json.loads((run_dir / "tokenizer" / "config.json").read_text())["kind"]


def test_pixels_tokens_are_the_binarised_image(tmp_path):
    assert main(["run", str(SMOKE_DIR / "tiny_pixels_nade.toml"), f"output_dir={tmp_path}"]) == 0
    manifest = json.loads((tmp_path / "tiny_pixels_nade" / "tokens" / "manifest.json").read_text())
    assert manifest["vocab_size"] == 2 and manifest["sequence_length"] == 784
