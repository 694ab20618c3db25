"""The `tokgen` command line: where overrides and flags may go."""

import pytest

from pipelines.cli import _split_config_and_overrides, parse_command_line


def test_overrides_may_follow_the_flags():
    args = parse_command_line(["run", "cfg.toml", "prior.kind=rnn", "--resume", "prior_training.max_steps=5", "--force"])
    assert (args.config, args.overrides, args.resume, args.force) == (
        "cfg.toml", ["prior.kind=rnn", "prior_training.max_steps=5"], True, True)
    args = parse_command_line(["train-prior", "--force", "cfg.toml", "seed=3"])
    assert (args.config, args.overrides, args.force) == ("cfg.toml", ["seed=3"], True)


def test_without_a_config_the_first_override_is_not_taken_for_one():
    args = parse_command_line(["run", "--resume", "seed=3", "name=x"])
    assert _split_config_and_overrides(args) == (None, ["seed=3", "name=x"])


@pytest.mark.parametrize("argv", [["run", "cfg.toml", "--resume", "--frobnicate"],
                                  ["run", "cfg.toml", "--resume", "stray"],
                                  ["generate", "runs/x", "--num", "4", "prior.kind=rnn"]])
def test_anything_else_after_the_flags_is_still_an_error(argv, capsys):
    with pytest.raises(SystemExit):
        parse_command_line(argv)
    assert "unrecognized arguments" in capsys.readouterr().err
