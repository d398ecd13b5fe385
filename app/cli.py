"""What every ``flask`` command group shares: one-line errors, JSON output, ISO 8601 options.

The groups live with their areas (``queue/cli.py``, ``demo/cli.py``, ``logs/cli.py``, ...);
``create_app`` registers them all (``register_cli``). Each command calls the same service
function as the matching endpoint, exits non-zero with a one-line message on error, and offers
``--json`` where its output is data.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click

from .errors import ApiError
from .timeutil import parse_iso


def error_line(exc: ApiError) -> str:
    """A service error in one line: its message, then each field's messages when it names
    fields (a validation error's ``details``, as the API returns them)."""
    if not isinstance(exc.details, dict) or not exc.details:
        return exc.message
    reasons = "; ".join(
        f"{field}: {' '.join(map(str, messages)) if isinstance(messages, list) else messages}"
        for field, messages in exc.details.items())
    return f"{exc.message}: {reasons}"


def reports_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn service errors into a one-line message (``error_line``) and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ApiError as exc:
            raise click.ClickException(error_line(exc)) from None

    return wrapper


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def iso_timestamp(_ctx: Any, _param: Any, value: str | None) -> Any:
    """click callback of every ISO 8601 option (``--before``, ``--since``, ...)."""
    if value is None:
        return None
    try:
        return parse_iso(value)
    except ValueError:
        raise click.BadParameter(f"not an ISO 8601 timestamp: {value}") from None
