"""How conode's command-line programs end: the command's status, or one clear error line — never a traceback."""

from __future__ import annotations

import sys
from typing import Callable, NoReturn

import click

from conode.errors import ConodeError


def run_guarded(fn: Callable[[], int | None], program: str, error_status: int) -> NoReturn:
    """Run *fn* and exit with its status; a ConodeError becomes `PROGRAM: error: ...` and *error_status*."""
    try:
        status = fn()
    except ConodeError as exc:
        click.echo(f"{program}: error: {exc}", err=True)
        sys.exit(error_status)
    except KeyboardInterrupt:
        click.echo(f"{program}: interrupted", err=True)
        sys.exit(130)
    sys.exit(status or 0)
