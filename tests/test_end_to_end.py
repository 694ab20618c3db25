"""End-to-end smoke runs of `tokgen run` on a tiny config: every stage, every output file."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipelines.cli import main
from pipelines.compression import CompressedTokens
from pipelines.prompting import continue_prompt, image_prompt_tokens
from pipelines.stages import check_prior_matches_tokens, load_matched_pair
from priors import SamplingOptions

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke" / "tiny.toml"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", str(SMOKE), f"output_dir={out}", "name=smoke"]) == 0
    return out / "smoke"


def test_run_writes_every_output(smoke_run):
    for relative in [
        "config.resolved.json", "tokenizer/config.json", "tokenizer/model.safetensors", "tokens/manifest.json",
        "tokens/train.parquet", "tokens/test.parquet", "prior/config.json", "prior/model.safetensors",
        "prior/tokgen.json", "samples/grid.png", "samples/completions.png", "samples/reconstructions.png",
        "samples/code_histogram.png", "samples/eval_samples.safetensors", "metrics.json",
    ]:
        assert (smoke_run / relative).is_file(), relative


def test_metrics_are_finite_and_named(smoke_run):
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert metrics["tokenizer"]["psnr"] > 5
    assert 0 < metrics["tokenizer"]["test_usage"] <= 1
    assert metrics["prior"]["bits_per_token"] > 0
    assert 0 <= metrics["samples"]["class_accuracy"] <= 1
    assert metrics["samples"]["frechet_distance"] >= 0 and metrics["samples"]["frechet_floor"] >= 0


def test_samples_are_class_conditioned_tokens(smoke_run):
    manifest = json.loads((smoke_run / "tokens" / "manifest.json").read_text())
    samples = load_file(str(smoke_run / "samples" / "eval_samples.safetensors"))
    assert samples["input_ids"].shape[1] == manifest["sequence_length"]
    assert int(samples["input_ids"].max()) < manifest["vocab_size"]
    assert sorted(set(samples["label"].tolist())) == list(range(manifest["num_classes"]))


def test_second_run_reuses_stages(smoke_run):
    before = {p: p.stat().st_mtime_ns for p in [smoke_run / "tokenizer" / "model.safetensors",
                                               smoke_run / "prior" / "model.safetensors"]}
    assert main(["run", str(SMOKE), f"output_dir={smoke_run.parent}", "name=smoke"]) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_changed_prior_retrains_only_the_prior(smoke_run):
    tokenizer_weights = smoke_run / "tokenizer" / "model.safetensors"
    prior_weights = smoke_run / "prior" / "model.safetensors"
    tokenizer_time, prior_time = tokenizer_weights.stat().st_mtime_ns, prior_weights.stat().st_mtime_ns
    assert main(["run", str(SMOKE), f"output_dir={smoke_run.parent}", "name=smoke",
                 "prior_training.max_steps=3"]) == 0
    assert tokenizer_weights.stat().st_mtime_ns == tokenizer_time
    assert prior_weights.stat().st_mtime_ns != prior_time


def test_generate_verb(smoke_run, tmp_path):
    out = tmp_path / "g.png"
    assert main(["generate", str(smoke_run), "--label", "3", "--num", "4", "--guidance-scale", "2", "--out", str(out)]) == 0
    assert out.is_file()


def write_prompt_image(path: Path) -> Path:
    """An RGB image of another size than the run's grey 28 x 28 digits: the prompt is converted like the data."""
    pixels = np.zeros((40, 36, 3), dtype=np.uint8)
    pixels[8:32, 14:22] = (250, 240, 230)  # a bright vertical bar, a "1"
    Image.fromarray(pixels).save(path)
    return path


def test_generate_continues_a_prompt_image(smoke_run, tmp_path):
    prompt = write_prompt_image(tmp_path / "one.png")
    out = tmp_path / "prompted.png"
    assert main(["generate", str(smoke_run), "--prompt", str(prompt), "--prompt-rows", "2", "--label", "1",
                 "--num", "3", "--out", str(out)]) == 0
    manifest = json.loads((smoke_run / "tokens" / "manifest.json").read_text())
    channels, height, width = manifest["image_shape"]
    assert Image.open(out).size == (4 * width + 5 * 2, height + 2 * 2)  # the prompt, then 3 completions, one row


def test_prompt_tokens_begin_every_completion(smoke_run, tmp_path):
    tokenizer, prior, tokenset = load_matched_pair(smoke_run, "cpu")
    manifest = tokenset.manifest
    prompt, image = image_prompt_tokens(write_prompt_image(tmp_path / "one.png"), tokenizer, manifest, prompt_rows=2)
    assert prompt.shape == (1, 2 * manifest.token_grid[1] * manifest.num_codebooks)
    assert image.shape == (1, *manifest.image_shape) and image.min() >= -1 and image.max() <= 1
    completed = continue_prompt(prior, prompt, label=None, num=4, options=SamplingOptions(), seed=0, device="cpu")
    assert completed.shape == (4, manifest.sequence_length)
    assert torch.equal(completed[:, : prompt.shape[1]], prompt.expand(4, -1))
    assert not torch.equal(completed[0], completed[1])  # sampled, not copied


@pytest.mark.parametrize("rows", ["0", "99"])
def test_prompt_rows_outside_the_grid_are_refused(smoke_run, tmp_path, capsys, rows):
    prompt = write_prompt_image(tmp_path / "one.png")
    assert main(["generate", str(smoke_run), "--prompt", str(prompt), "--prompt-rows", rows]) == 2
    assert "--prompt-rows gives" in capsys.readouterr().err


def test_unreadable_prompt_image_names_the_file(smoke_run, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    assert main(["generate", str(smoke_run), "--prompt", str(broken)]) == 2
    assert str(broken) in capsys.readouterr().err


def test_prior_of_other_tokens_is_refused(smoke_run):
    """`generate`, `sample` and prior_mixture.py refuse a prior trained on another tokenizer's tokens, or of other sizes."""
    _, prior, tokenset = load_matched_pair(smoke_run, "cpu")
    check_prior_matches_tokens(prior, smoke_run / "prior", tokenset.manifest)
    other_tokenizer = dataclasses.replace(tokenset.manifest, tokenizer_sha256="0" * 64)
    with pytest.raises(ValueError, match="trained on tokens of tokenizer sha256"):
        check_prior_matches_tokens(prior, smoke_run / "prior", other_tokenizer)
    longer = dataclasses.replace(tokenset.manifest, sequence_length=tokenset.manifest.sequence_length + 1)
    with pytest.raises(ValueError, match="does not match the token manifest"):
        check_prior_matches_tokens(prior, smoke_run / "prior", longer)


def test_bad_config_key_exits_with_message(tmp_path, capsys):
    assert main(["run", str(SMOKE), f"output_dir={tmp_path}", "prior_training.max_stepz=3"]) == 2
    assert "max_stepz" in capsys.readouterr().err


def test_interrupted_stage_is_refused_then_resumed(smoke_run, capsys):
    """Checkpoints of an unfinished stage are never thrown away: plain re-runs refuse, --resume continues."""
    args = ["train-tokenizer", str(SMOKE), f"output_dir={smoke_run.parent}", "name=smoke"]
    (smoke_run / "tokenizer" / "stage.json").unlink()  # as if the run died after its last checkpoint
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert (smoke_run / "tokenizer" / "stage.json").is_file()


def test_two_fresh_runs_of_one_config_train_the_same_weights(tmp_path):
    """Initial weights come from the global RNG: the stages seed it, whatever ran before in the process."""
    weights = []
    for name in ("first", "second"):
        torch.rand(7)  # RNG state left behind by earlier work must not matter
        overrides = [f"output_dir={tmp_path}", f"name={name}", "tokenizer_training.max_steps=2",
                     "prior_training.max_steps=2"]
        for verb in ("train-tokenizer", "export-tokens", "train-prior"):
            assert main([verb, str(SMOKE), *overrides]) == 0
        weights.append({part: load_file(str(tmp_path / name / part / "model.safetensors"))
                        for part in ("tokenizer", "prior")})
    for part in ("tokenizer", "prior"):
        first, second = weights[0][part], weights[1][part]
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), f"{part} {key} differs between identical runs"


def test_stage_stopped_by_max_minutes_is_used_and_resume_trains_it_on(tmp_path):
    """A spent time budget stops the tokenizer at its first log step (2 of 6); stage.json says so,
    a plain re-run reuses it, and --resume trains it on to max_steps."""
    args = ["train-tokenizer", str(SMOKE), f"output_dir={tmp_path}", "name=budget",
            "tokenizer_training.max_minutes=1e-9"]
    assert main(args) == 0
    stage_file = tmp_path / "budget" / "tokenizer" / "stage.json"
    stage = json.loads(stage_file.read_text())
    assert stage["steps"] == 2 and stage["stopped_early"] and stage["max_steps"] == 6
    weights = tmp_path / "budget" / "tokenizer" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert main(args) == 0 and weights.stat().st_mtime_ns == before  # reused, not retrained
    # The budget is not part of the stage's identity: resuming under another one continues from step 2.
    assert main(args[:-1] + ["--resume"]) == 0
    stage = json.loads(stage_file.read_text())
    assert stage["steps"] == 6 and "stopped_early" not in stage
    assert weights.stat().st_mtime_ns != before


def test_compress_an_image_token_split_at_about_its_nll(smoke_run, tmp_path, capsys):
    out = tmp_path / "test.tgac"
    assert main(["compress", str(smoke_run), "--out", str(out), "--limit", "6", "--conditioned"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    _, _, tokenset = load_matched_pair(smoke_run, "cpu")
    assert report["items"] == 6 and "seconds" not in report  # images: no padding, every token coded
    assert report["coded_tokens"] == 6 * tokenset.manifest.sequence_length
    assert report["ideal_bits"] <= report["stream_bits"] <= report["ideal_bits"] + 6 * 10
    assert main(["decompress", str(out), str(smoke_run)]) == 0
    decoded = load_file(str(tmp_path / "test" / "tokens.safetensors"))
    assert torch.equal(decoded["input_ids"], tokenset.tensors("test")["input_ids"][:6])
    assert decoded["label"].tolist() == tokenset.tensors("test")["label"][:6].tolist()
    assert (tmp_path / "test" / "decoded.png").read_bytes()[:4] == b"\x89PNG"


def test_compress_your_own_images_and_get_them_back(smoke_run, tmp_path):
    """`tokgen compress --input` takes image files of any size and mode; `decompress` writes each back
    as the run's tokenizer decodes it, at the run's size, under its own name, with its codes."""
    rng = np.random.default_rng(0)
    (tmp_path / "pics" / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "pics" / "colour.png")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(tmp_path / "pics" / "sub" / "small.jpg")
    out = tmp_path / "pics.tgac"
    assert main(["compress", str(smoke_run), "--input", str(tmp_path / "pics"), "--out", str(out)]) == 0
    assert [s["name"] for s in CompressedTokens.from_bytes(out.read_bytes()).header["sources"]] == ["colour", "sub/small"]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["items"] == 2 and [f["name"] for f in report["decoded"]["files"]] == ["colour", "sub/small"]
    assert np.isfinite(report["decoded"]["psnr_db"])
    assert main(["decompress", str(out), str(smoke_run), "--out", str(tmp_path / "back")]) == 0
    _, _, tokenset = load_matched_pair(smoke_run, "cpu")
    channels, height, width = tokenset.manifest.image_shape
    for name in ("colour", "sub/small"):
        image = Image.open(tmp_path / "back" / f"{name}.png")
        assert image.size == (width, height) and len(image.getbands()) == channels
    codes = load_file(str(tmp_path / "back" / "codes.safetensors"))
    assert codes["colour"].shape == (*tokenset.manifest.token_grid, tokenset.manifest.num_codebooks)
