"""The `cogstream` console script: every subcommand resolves to a module with --help, aliases, one-line errors."""
from __future__ import annotations

import pytest

from cogstream_jax import cli
from cogstream_jax.cli_utils import ArgumentParser


def test_usage_lists_every_command(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    assert "--" in capsys.readouterr().out


def test_unknown_command_fails_with_usage(capsys):
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_underscore_flags_accept_hyphenated_aliases():
    parser = ArgumentParser()
    parser.add_argument("--model_path")
    parser.add_argument("--max-new-tokens", type=int)
    args = parser.parse_args(["--model-path", "m", "--max_new_tokens", "7"])
    assert (args.model_path, args.max_new_tokens) == ("m", 7)
