"""`tokgen compare` on the tiny config: one table of models on one split, each NLL named by its kind."""

import json
import math
from unittest.mock import ANY
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.compare import load_compare_config
from pipelines.config import ConfigError
from pipelines.tokenset import load_tokenset
from priors import PRIORS, load_prior
from tokenizers_vq import TOKENIZERS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "compare"
TINY = CONFIG_DIR / "tiny.toml"


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["compare", str(TINY), f"output_dir={out}"]) == 0
    directory = out / "compare_tiny"
    return directory, json.loads((directory / "comparison.json").read_text())


def rows_by_name(report: dict) -> dict:
    return {row["name"]: row for row in report["models"]}


def test_writes_table_json_and_chart(comparison):
    directory, report = comparison
    for name in ("comparison.md", "comparison.json", "comparison.png", "config.resolved.json"):
        assert (directory / name).is_file(), name
    assert (directory / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (directory / "comparison.md").read_text()
    for name in ("histogram", "nade", "vae", "gan", "two_stage"):
        assert f"| {name} |" in table
    assert "no density" in table
    assert "-ELBO " in table and "-log p_prior(z)" in table  # the VAE's bound and the two-stage bound's terms
    for row in report["models"]:
        assert Path(row["sample_grid"]).is_file()
        assert row["sample_seconds_per_image"] > 0


def test_every_model_scores_the_whole_test_split(comparison):
    _, report = comparison
    assert report["split_sizes"]["test"] == 100
    assert {row["test_items"] for row in report["models"]} == {100}


def test_exact_models_say_exact(comparison):
    rows = rows_by_name(comparison[1])
    for name in ("histogram", "nade"):
        row = rows[name]
        assert row["likelihood"] == "exact" and row["space"] == "pixels"
        assert row["nll_nats_per_image"] == pytest.approx(row["prior_nll_nats"])
        assert row["bits_per_dim"] == pytest.approx(row["nll_nats_per_image"] / (784 * math.log(2.0)))
        # binary pixels: the per-token NLL of a model at least as good as uniform is below one bit
        assert 0 < row["bits_per_token"] < 1.0


def test_vae_reports_an_estimate_below_its_bound(comparison):
    row = rows_by_name(comparison[1])["vae"]
    assert row["likelihood"].startswith("estimate") and row["importance_samples"] == 20
    # the importance-weighted estimate of log p(x) is at least the ELBO (on average over 100 images)
    assert row["nll_nats_per_image"] <= row["negative_elbo_nats"] + 1e-6


def test_gan_has_no_likelihood_but_a_sample_score(comparison):
    row = rows_by_name(comparison[1])["gan"]
    assert row["likelihood"] == "no density"
    assert row.get("nll_nats_per_image") is None and row.get("bits_per_token") is None
    assert row["frechet_distance"] >= 0 and row["frechet_floor"] >= 0


def test_two_stage_row_is_the_decoder_plus_prior_bound(comparison):
    row = rows_by_name(comparison[1])["two_stage"]
    assert row["likelihood"] == "bound (two-stage)" and row["tokenizer"] == "vqvae"
    assert row["nll_nats_per_image"] == pytest.approx(row["decoder_nll_nats"] + row["prior_nll_nats"])
    assert row["decoder_nll_nats"] > 0 and row["prior_nll_nats"] > 0
    assert row["sequence_length"] == 49 and row["tokenizer_parameters"] > 0
    assert row["train_seconds"] > 0 and row["tokenizer_train_seconds"] > 0


def test_pixel_models_share_one_token_export(comparison):
    directory, report = comparison
    rows = rows_by_name(report)
    assert len({rows[name]["tokenizer_folder"] for name in ("histogram", "nade", "vae", "gan")}) == 1
    assert len(list((directory / "tokenizers").iterdir())) == 2  # pixels and the VQ-VAE


def test_second_compare_reuses_training_and_its_times(comparison):
    directory, report = comparison
    weights = directory / "models" / "nade" / "prior" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert main(["compare", str(TINY), f"output_dir={directory.parent}", 'only=["nade"]']) == 0
    again = json.loads((directory / "comparison.json").read_text())
    assert [row["name"] for row in again["models"]] == ["nade"]
    assert weights.stat().st_mtime_ns == before
    assert again["models"][0]["train_seconds"] == rows_by_name(report)["nade"]["train_seconds"]
    assert again["models"][0]["nll_nats_per_image"] == pytest.approx(rows_by_name(report)["nade"]["nll_nats_per_image"])


def test_evaluation_is_reused_until_its_config_changes(comparison):
    directory, _ = comparison
    row_file = directory / "models" / "histogram" / "compare_row.json"
    first = json.loads(row_file.read_text())
    assert main(["compare", str(TINY), f"output_dir={directory.parent}", 'only=["histogram"]']) == 0
    assert json.loads(row_file.read_text()) == first  # same trained model, same evaluation: not re-scored
    assert main(["compare", str(TINY), f"output_dir={directory.parent}", 'only=["histogram"]',
                 "evaluation.sample_images=8"]) == 0
    second = json.loads(row_file.read_text())
    assert second["key"] != first["key"]
    assert second["row"]["evaluation_seconds"] != first["row"]["evaluation_seconds"]
    assert second["row"]["nll_nats_per_image"] == pytest.approx(first["row"]["nll_nats_per_image"])


def test_validation_figures_score_the_validation_split_when_asked(comparison):
    directory, report = comparison
    assert "val_nll_nats_per_image" not in rows_by_name(report)["histogram"]  # off by default
    assert main(["compare", str(TINY), f"output_dir={directory.parent}", 'only=["histogram", "two_stage"]',
                 "evaluation.score_validation=true"]) == 0
    rows = rows_by_name(json.loads((directory / "comparison.json").read_text()))
    histogram, two_stage = rows["histogram"], rows["two_stage"]
    prior = load_prior(directory / "models" / "histogram" / "prior")
    val = load_tokenset(directory / "tokenizers" / histogram["tokenizer_folder"] / "tokens").tensors("val")
    assert histogram["val_nll_nats_per_image"] == pytest.approx(-prior.log_prob(val["input_ids"]).double().mean().item())
    assert histogram["val_nll_nats_per_image"] != pytest.approx(histogram["nll_nats_per_image"])  # not the test split
    assert two_stage["val_nll_nats_per_image"] == pytest.approx(
        two_stage["val_decoder_nll_nats"] + two_stage["val_prior_nll_nats"])
    assert "(val " in (directory / "comparison.md").read_text()


def test_code_search_tightens_the_two_stage_bound(tmp_path):
    # 4 codes and 20 test images keep the search (49 positions x 3 other codes per image) to seconds.
    assert main(["compare", str(TINY), f"output_dir={tmp_path}", 'only=["two_stage"]', "data.max_test=20",
                 "models.two_stage.tokenizer.quantizer.codebook_size=4", "evaluation.code_search_sweeps=1",
                 "evaluation.sample_quality=false"]) == 0
    row = json.loads((tmp_path / "compare_tiny" / "comparison.json").read_text())["models"][0]
    assert row["encoder_bound_nats"] == pytest.approx(row["decoder_nll_nats"] + row["prior_nll_nats"])
    assert row["searched_best_code_nats"] == pytest.approx(row["searched_decoder_nll_nats"] + row["searched_prior_nll_nats"])
    assert row["nll_nats_per_image"] < row["searched_best_code_nats"] < row["encoder_bound_nats"]
    assert row["searched_changed_tokens"] > 0
    assert row["likelihood"].startswith("bound (two-stage, codes searched")
    assert "best searched code:" in (tmp_path / "compare_tiny" / "comparison.md").read_text()


def test_model_overrides_reach_one_or_every_model():
    config = load_compare_config(TINY, ["models.nade.training.max_steps=3", "models.*.training.batch_size=7"])
    specs = {spec.name: spec for spec in config.models}
    assert specs["nade"].training.max_steps == 3 and specs["vae"].training.max_steps == 8
    assert {spec.training.batch_size for spec in config.models} == {7}


def test_bad_model_override_fails_with_message(tmp_path, capsys):
    assert main(["compare", str(TINY), f"output_dir={tmp_path}", "models.nope.training.max_steps=1"]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="hidden_sise"):
        load_compare_config(TINY, ["models.nade.prior.hidden_sise=3"])


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_compare_configs_parse_and_build(path):
    config = load_compare_config(path)
    assert config.models
    for spec in config.models:
        section = spec.tokenizer or config.tokenizer
        tokenizer_config_cls, tokenizer_cls = TOKENIZERS[section.kind]
        tokenizer = tokenizer_cls(tokenizer_config_cls.from_dict(dict(section.fields)))
        prior_config_cls, prior_cls = PRIORS[spec.prior.kind]
        fields = dict(spec.prior.fields, vocab_size=tokenizer.vocab_size, seq_len=16, num_classes=0)
        assert prior_cls(prior_config_cls.from_dict(fields)) is not None


def test_fvsbn_with_a_list_of_l1_strengths_chooses_one_per_pixel_on_validation(tmp_path):
    config = tmp_path / "tiny_fvsbn.toml"
    config.write_text(TINY.read_text() + '''
[[models]]
name = "fvsbn_banks"
prior = { kind = "fvsbn", l1_penalty = [0.0, 1e-3] }
training = { max_steps = 6, batch_size = 32, warmup_steps = 1, learning_rate = 3e-2, checkpoint_every = 0, eval_every = 3 }
''')
    assert main(["compare", str(config), f"output_dir={tmp_path}", 'only=["fvsbn_banks"]',
                 "evaluation.sample_quality=false"]) == 0
    directory = tmp_path / "compare_tiny" / "models" / "fvsbn_banks" / "prior"
    record = json.loads((directory / "stage.json").read_text())["final_metrics"]
    assert sum(record["positions_per_l1_penalty"].values()) == 784
    prior = load_prior(directory)
    assert prior.position_bank.bincount(minlength=2).tolist() == list(record["positions_per_l1_penalty"].values())
    row = json.loads((tmp_path / "compare_tiny" / "comparison.json").read_text())["models"][0]
    assert row["parameters"] == prior.parameters_in_use() == 784 * 784 + 2 * 784  # one bank's weight, bias, class bias
    assert row["likelihood"] == "exact" and math.isfinite(row["nll_nats_per_image"])
    assert row["positions_per_l1_penalty"] == record["positions_per_l1_penalty"] == {"0.0": ANY, "0.001": ANY}
    assert "L1 strength chosen per position on validation: 0.0 for" in (tmp_path / "compare_tiny" / "comparison.md").read_text()


def test_prior_mixture_benchmark_scores_an_exact_mixture(comparison, tmp_path, monkeypatch):
    import sys

    from benchmarks import prior_mixture
    directory, report = comparison
    rows = rows_by_name(report)
    tokens = directory / "tokenizers" / rows["nade"]["tokenizer_folder"] / "tokens"
    priors = [directory / "models" / name / "prior" for name in ("histogram", "nade")]
    out = tmp_path / "mixture.json"
    monkeypatch.setattr(sys, "argv", ["prior_mixture", str(tokens), *map(str, priors), "--out", str(out)])
    prior_mixture.main()
    test = json.loads(out.read_text())["splits"]["test"]
    members, mixture = test["member_nll_nats"], test["mixture_nll_nats"]["2"]
    assert members[0] == pytest.approx(rows["histogram"]["nll_nats_per_image"], rel=1e-5)
    assert mixture <= sum(members) / 2  # Jensen
    assert mixture <= min(members) + math.log(2)  # every item keeps half of the best member's probability
    assert mixture != pytest.approx(sum(members) / 2)  # two different models: mixing changes the figure
