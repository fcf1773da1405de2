"""What every conversion CLI shares: official underscore flags with hyphen aliases, one-line user errors."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from cogstream_jax.errors import UserError

EXIT_USER_ERROR = 2


def add_flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """`--model_path` plus its alias `--model-path` (same destination)."""
    flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*flags, dest=name, **kwargs)


def run_reporting_user_errors(body: Callable[[], None]) -> int:
    """Run `body`; a bad input (UserError or an unwritable path) prints one line and returns exit code 2."""
    try:
        body()
    except (UserError, OSError) as e:
        message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0
