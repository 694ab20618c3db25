"""`extends = "base.toml"`: a config that holds only what it changes from another."""

from pathlib import Path

import pytest

from pipelines.config import ConfigError, fingerprint, load_run_config, read_toml_file

PIPELINE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pipeline"
BASE = """
name = "base"
seed = 3

[tokenizer]
kind = "vqvae"
hidden_channels = 16
embedding_dim = 8

[tokenizer.quantizer]
codebook_size = 32
commitment_weight = 0.5

[prior_training]
max_steps = 100
batch_size = 8
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_variant_changes_its_keys_and_keeps_the_rest_of_each_table(tmp_path):
    write(tmp_path, "base.toml", BASE)
    variant = write(tmp_path, "variants/long.toml", 'extends = "../base.toml"\nname = "long"\n\n'
                    "[tokenizer]\nhidden_channels = 32\n\n[tokenizer.quantizer]\ncodebook_size = 64\n\n"
                    "[prior_training]\nmax_steps = 400\n")
    config = load_run_config(variant)
    assert (config.name, config.seed) == ("long", 3)
    assert config.tokenizer.kind == "vqvae"
    assert config.tokenizer.fields["hidden_channels"] == 32 and config.tokenizer.fields["embedding_dim"] == 8
    assert config.tokenizer.fields["quantizer"] == {"codebook_size": 64, "commitment_weight": 0.5}
    assert (config.prior_training.max_steps, config.prior_training.batch_size) == (400, 8)


def test_a_variant_equals_its_base_with_the_same_overrides(tmp_path):
    """So a stage trained from the base plus overrides is reused by the variant, and back."""
    base = write(tmp_path, "base.toml", BASE)
    variant = write(tmp_path, "long.toml", 'extends = "base.toml"\n[tokenizer]\nhidden_channels = 32\n')
    assert fingerprint(load_run_config(variant).tokenizer) == \
        fingerprint(load_run_config(base, ["tokenizer.hidden_channels=32"]).tokenizer)


def test_lists_are_replaced_whole(tmp_path):
    write(tmp_path, "base.toml", "[tokenizer]\nstrides = [4, 4, 5]\n")
    variant = write(tmp_path, "v.toml", 'extends = "base.toml"\n[tokenizer]\nstrides = [4, 5]\n')
    assert read_toml_file(variant)["tokenizer"]["strides"] == [4, 5]


def test_a_table_of_another_kind_replaces_the_base_table(tmp_path):
    """Fields of a VQ-VAE mean nothing to another kind, so they are not carried over."""
    write(tmp_path, "base.toml", BASE)
    variant = write(tmp_path, "v.toml", 'extends = "base.toml"\n[tokenizer]\nkind = "vqgan"\nembedding_dim = 4\n')
    assert read_toml_file(variant)["tokenizer"] == {"kind": "vqgan", "embedding_dim": 4}


def test_a_chain_of_extends_applies_in_order(tmp_path):
    write(tmp_path, "a.toml", BASE)
    write(tmp_path, "b.toml", 'extends = "a.toml"\nseed = 5\n[prior_training]\nmax_steps = 200\n')
    c = write(tmp_path, "c.toml", 'extends = "b.toml"\n[prior_training]\nbatch_size = 2\n')
    config = load_run_config(c)
    assert (config.seed, config.prior_training.max_steps, config.prior_training.batch_size) == (5, 200, 2)


def test_a_loop_of_extends_is_a_clear_error(tmp_path):
    write(tmp_path, "a.toml", 'extends = "b.toml"\n')
    write(tmp_path, "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="comes back to itself"):
        read_toml_file(tmp_path / "a.toml")


def test_a_missing_base_names_the_file_that_asked_for_it(tmp_path):
    variant = write(tmp_path, "v.toml", 'extends = "nowhere.toml"\n')
    with pytest.raises(ConfigError, match=r"v\.toml: extends 'nowhere\.toml', but .*nowhere\.toml does not exist"):
        read_toml_file(variant)


def test_extends_must_be_a_path(tmp_path):
    variant = write(tmp_path, "v.toml", "extends = 3\n")
    with pytest.raises(ConfigError, match="extends must be the path"):
        read_toml_file(variant)


def test_the_long_cpu_recipe_is_the_short_one_with_its_overrides():
    """fsdd_cpu_long.toml is the command BENCHMARKS.md measured (fsdd_cpu.toml plus overrides), plus a longer prior."""
    long = load_run_config(PIPELINE_CONFIGS / "fsdd_cpu_long.toml", ["name=fsdd_cpu"])
    measured = load_run_config(PIPELINE_CONFIGS / "fsdd_cpu.toml", [
        "tokenizer.hidden_channels=16", "tokenizer.decoder_hidden_channels=24", "tokenizer.strides=[4,5,2]",
        "tokenizer.quantizer.num_quantizers=1", "tokenizer.si_snr_weight=1", "tokenizer.si_snr_start=3200",
        "tokenizer_training.max_steps=8000", "tokenizer_training.batch_size=20",
        "tokenizer.encoder_latent_dilations=[1,3,9]", "tokenizer.decoder_latent_dilations=[1,3,9]",
        "prior_training.max_steps=4500"])
    assert long.to_dict() == measured.to_dict()
