"""Every config in configs/ parses and builds; bad keys and kinds fail with a useful message."""

import json
from pathlib import Path

import pytest

from pipelines.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    fingerprint,
    load_run_config,
    run_config_from_dict,
)
from priors import PRIORS
from tokenizers_vq import TOKENIZERS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# configs/compare/ holds `tokgen compare` configs, a different format: tests/test_compare.py builds them.
ALL_CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.toml") if p.parent.name != "compare")


def test_there_are_configs():
    assert any(p.parent.name == "pipeline" for p in ALL_CONFIGS)
    assert any(p.parent.name == "smoke" for p in ALL_CONFIGS)


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_parses_and_builds(path):
    config = load_run_config(path)
    tokenizer_config = config.tokenizer_config()
    _, tokenizer_cls = TOKENIZERS[config.tokenizer.kind]
    tokenizer = tokenizer_cls(tokenizer_config)
    prior_config = config.prior_config(vocab_size=tokenizer.vocab_size, seq_len=16, num_classes=10)
    _, prior_cls = PRIORS[config.prior.kind]
    assert prior_cls(prior_config) is not None


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_resolved_config_reads_back_as_the_same_config(path):
    """A run records `to_dict()` as config.resolved.json; `tokgen generate --prompt` reads it back."""
    config = load_run_config(path)
    resolved = json.loads(json.dumps(config.to_dict(), default=str))
    assert run_config_from_dict(resolved) == config


def test_cpu_default_file_equals_packaged_default():
    """`tokgen run` without a file runs the packaged copy of configs/pipeline/mnist_cpu.toml."""
    packaged = Path(__file__).resolve().parents[1] / "pipelines" / "default_run.toml"
    assert packaged.read_text() == (CONFIG_DIR / "pipeline" / "mnist_cpu.toml").read_text()
    assert load_run_config(CONFIG_DIR / "pipeline" / "mnist_cpu.toml") == load_run_config(None)


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[prior_training]\nmax_stepz = 3\n")
    with pytest.raises(ConfigError, match=r"max_stepz.*valid keys:.*max_steps"):
        load_run_config(path)


def test_unknown_kind_lists_registry(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[tokenizer]\nkind = "vqvea"\n')
    with pytest.raises(ConfigError, match="vqvae"):
        load_run_config(path)


def test_unknown_component_field_is_rejected(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[prior]\nkind = "transformer"\nhidden_sise = 3\n')
    with pytest.raises(ConfigError, match="hidden_sise"):
        load_run_config(path)


def test_prior_may_not_set_manifest_fields(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[prior]\nkind = "transformer"\nvocab_size = 3\n')
    with pytest.raises(ConfigError, match="manifest"):
        load_run_config(path)


def test_overrides_are_typed():
    data = apply_overrides({}, ["prior_training.max_steps=7", "name=abc", "sampling.guidance_scale=2.5",
                                "tokenizer_training.mixed_precision=no"])
    assert data["prior_training"]["max_steps"] == 7
    assert data["name"] == "abc"
    assert data["sampling"]["guidance_scale"] == 2.5
    assert data["tokenizer_training"]["mixed_precision"] == "no"
    config = load_run_config(None, ["prior_training.max_steps=7", "name=abc"])
    assert isinstance(config, RunConfig) and config.prior_training.max_steps == 7 and config.name == "abc"


def test_override_of_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.toml")


def test_fingerprint_ignores_the_order_a_section_was_written_in(tmp_path):
    """A key moved from the command line into the TOML is the same config: its stages are reused."""
    in_file = tmp_path / "in_file.toml"
    in_file.write_text('[tokenizer]\nkind = "vqvae"\nhidden_channels = 16\nembedding_dim = 8\n')
    on_command_line = tmp_path / "on_command_line.toml"
    on_command_line.write_text('[tokenizer]\nkind = "vqvae"\nembedding_dim = 8\n')
    written = load_run_config(in_file)
    overridden = load_run_config(on_command_line, ["tokenizer.hidden_channels=16"])
    assert list(written.tokenizer.fields) != list(overridden.tokenizer.fields)  # the orders do differ
    assert fingerprint(written.tokenizer) == fingerprint(overridden.tokenizer)
    changed = load_run_config(on_command_line, ["tokenizer.hidden_channels=32"])
    assert fingerprint(changed.tokenizer) != fingerprint(written.tokenizer)


def test_the_judge_of_an_audio_run_changes_its_evaluation_not_its_samples():
    from pipelines.stages import Run

    path = CONFIG_DIR / "pipeline" / "fsdd_cpu.toml"
    plain = Run(load_run_config(path))
    banded = Run(load_run_config(path, ["audio.classifier.band_limited_copies=2"]))
    assert banded.config.audio.classifier.band_limited_copies == 2
    assert banded.samples_fingerprint() == plain.samples_fingerprint()  # the samples are reused, then judged anew
    spectrograms = Run(load_run_config(path, ["audio.classifier.hop=64"]))  # the front end draws the spectrograms
    assert spectrograms.samples_fingerprint() != plain.samples_fingerprint()


def test_a_field_added_later_stays_out_of_fingerprints_at_its_default():
    import dataclasses

    from tokenizers_vq.audio import AudioVQVAEConfig

    config = AudioVQVAEConfig()
    added_later = {"target_cutoff_hz", "si_snr_start", "si_snr_ramp_steps", "pack_clips", "decoder_hidden_channels",
                   "encoder_latent_dilations", "decoder_latent_dilations"}
    older = {name: value for name, value in dataclasses.asdict(config).items() if name not in added_later}
    del older["quantizer"]["quantizer"]["rotation_trick"]  # added later to the quantizer's own config
    assert fingerprint("tokenizer", config) == fingerprint("tokenizer", older)  # runs from before keep their stages
    assert fingerprint("tokenizer", dataclasses.replace(config, target_cutoff_hz=2000.0)) != fingerprint("tokenizer", older)
    assert fingerprint("tokenizer", dataclasses.replace(config, si_snr_start=100)) != fingerprint("tokenizer", older)
    assert fingerprint("tokenizer", dataclasses.replace(config, si_snr_ramp_steps=100)) != fingerprint("tokenizer", older)
    assert fingerprint("tokenizer", dataclasses.replace(config, pack_clips=True)) != fingerprint("tokenizer", older)
    wider = dataclasses.replace(config, decoder_hidden_channels=48)
    assert fingerprint("tokenizer", wider) != fingerprint("tokenizer", older)
    for name in ("encoder_latent_dilations", "decoder_latent_dilations"):
        assert fingerprint("tokenizer", dataclasses.replace(config, **{name: (1, 3)})) != fingerprint("tokenizer", older)
    rotated = dataclasses.replace(config.quantizer, quantizer=dataclasses.replace(config.quantizer.quantizer,
                                                                                 rotation_trick=True))
    assert fingerprint("tokenizer", dataclasses.replace(config, quantizer=rotated)) != fingerprint("tokenizer", older)
    assert fingerprint(dataclasses.replace(config, si_snr_cutoff_hz=1500.0)) != fingerprint(config)  # others always count


def test_a_whole_number_for_a_float_field_is_the_same_setting_and_fingerprint(tmp_path):
    """`si_snr_weight=1` on the command line and `1.0` in the TOML must not retrain a stage."""
    written = tmp_path / "written.toml"
    written.write_text('[tokenizer]\nkind = "audio_vqvae"\nsi_snr_weight = 1.0\n[tokenizer.quantizer]\nkind = "residual_vq"\n'
                       '[tokenizer.quantizer.quantizer]\ncommitment_weight = 2.0\n[tokenizer_training]\nlearning_rate = 1.0\n')
    bare = tmp_path / "bare.toml"
    bare.write_text('[tokenizer]\nkind = "audio_vqvae"\n[tokenizer.quantizer]\nkind = "residual_vq"\n')
    overridden = load_run_config(bare, ["tokenizer.si_snr_weight=1", "tokenizer.quantizer.quantizer.commitment_weight=2",
                                        "tokenizer_training.learning_rate=1", "tokenizer.hidden_channels=16"])
    config = load_run_config(written, ["tokenizer.hidden_channels=16"])
    assert fingerprint(overridden.tokenizer) == fingerprint(config.tokenizer)
    assert fingerprint(overridden.tokenizer_training.identity()) == fingerprint(config.tokenizer_training.identity())
    assert type(overridden.tokenizer.fields["si_snr_weight"]) is float
    assert type(overridden.tokenizer.fields["quantizer"]["quantizer"]["commitment_weight"]) is float
    assert type(overridden.tokenizer.fields["hidden_channels"]) is int  # int fields stay whole
    assert fingerprint(load_run_config(bare, ["tokenizer.si_snr_weight=2"]).tokenizer) != fingerprint(config.tokenizer)


def test_pipeline_tables_read_whole_numbers_as_floats_for_optional_floats_too():
    """The same rule as the components': `float | None` fields (a compare model's published figure) too."""
    from dataclasses import dataclass

    from pipelines.config_tables import build_dataclass

    @dataclass(frozen=True)
    class Table:
        figure: float | None = None
        count: int = 0

    built = build_dataclass(Table, {"figure": 88, "count": 3}, "table")
    assert type(built.figure) is float and type(built.count) is int
