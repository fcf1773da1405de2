"""What every command-line entry point shares: the official underscore flag names with hyphenated aliases,
and user errors reported on one line with a non-zero exit code instead of a traceback."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from cogstream_jax.errors import UserError

EXIT_USER_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse that accepts `--model-path` wherever `--model_path` is declared (and vice versa)."""

    def add_argument(self, *flags, **kwargs):  # type: ignore[override]
        names = list(flags)
        for flag in flags:
            if flag.startswith("--") and ("_" in flag or "-" in flag[2:]):
                for alias in (flag.replace("_", "-"), "--" + flag[2:].replace("-", "_")):
                    if alias not in names:
                        names.append(alias)
        if names and names[0].startswith("--") and "dest" not in kwargs and "action" not in ("help", "version"):
            kwargs["dest"] = names[0][2:].replace("-", "_")
        return super().add_argument(*names, **kwargs)


def add_flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """`--model_path` plus its alias `--model-path` on any argparse parser."""
    flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*flags, dest=name, **kwargs)


def run_cli(body: Callable[[], object]) -> int:
    """Run `body`; a UserError (or an unreadable/unwritable path) prints one line and returns exit code 2.

    An int returned by `body` is the exit code; anything else means success.
    """
    try:
        result = body()
        return result if isinstance(result, int) else 0
    except (UserError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def forward(argv: Sequence[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)
