"""The log level vocabulary of the API (API.md §4.1).

Records are stored with one of five canonical levels; the API names them ``debug``, ``info``,
``warn``, ``error`` and ``fatal`` (the reference's words). ``warning`` and ``critical`` are
accepted as aliases on input, in any letter case. A Python level in between (a custom level 25)
is stored as the canonical level at or below it (25 -> info).
"""

from __future__ import annotations

import logging

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
}
ALIASES: dict[str, str] = {"warning": "warn", "critical": "fatal"}
ACCEPTED = tuple(LEVELS) + tuple(ALIASES)

NAME_OF_LEVELNO = {number: name for name, number in LEVELS.items()}
CANONICAL_LEVELNOS = tuple(sorted(LEVELS.values()))


def levelno_of(name: str) -> int:
    """The level number of an API level name or alias; ``ValueError`` when unknown."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in LEVELS:
        raise ValueError(f"unknown log level {name!r}")
    return LEVELS[key]


def canonical_levelno(levelno: int) -> int:
    """The canonical level at or below ``levelno`` (anything under DEBUG counts as DEBUG)."""
    best = logging.DEBUG
    for number in CANONICAL_LEVELNOS:
        if levelno >= number:
            best = number
    return best


def level_name(levelno: int) -> str:
    return NAME_OF_LEVELNO[canonical_levelno(levelno)]
