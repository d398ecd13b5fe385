"""Where a stream stands in an append-only table, and the resume cursor built from it.

Row ids come from a sequence, but on PostgreSQL two transactions can commit in the other order
than they took their ids: id 11 can be visible while id 10 is still in flight. A plain "last id
seen" would then skip 10 for good. A ``Position`` is therefore a *floor* (every id at or below
it is accounted for) plus the few ids above the floor already handed out. The hub raises the
floor once the ids below have arrived, or once it has waited long enough for a hole to be sure
it was a rolled-back insert.

A cursor is the text form of the two positions of a socket (delivery events, system logs):
``"<event floor>[.<id>...]-<log floor>[.<id>...]"``, e.g. ``"120-87"`` or ``"120.123-87"``.
Clients treat it as opaque and hand it back as ``?cursor=``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

# More extra ids than this in a cursor means someone made it up.
MAX_CURSOR_EXTRAS = 10_000
# Row ids are 64-bit signed integers on both databases: a resume point above this is not an id
# (PostgreSQL would refuse the query, and the stream would close as if the database were down).
MAX_ROW_ID = 2**63 - 1
_ROW_ID = re.compile(r"[0-9]{1,19}")


class CursorError(ValueError):
    """A cursor that this server did not produce."""


@dataclass
class Position:
    """The ids of one table already accounted for: ``<= floor`` or in ``extras``."""

    floor: int = 0
    extras: set[int] = field(default_factory=set)

    def covers(self, row_id: int) -> bool:
        return row_id <= self.floor or row_id in self.extras

    def add(self, row_id: int) -> None:
        if row_id <= self.floor:
            return
        self.extras.add(row_id)
        self._compact()

    def raise_floor(self, floor: int) -> None:
        """Account for every id up to ``floor`` (the hub vouches for them)."""
        if floor > self.floor:
            self.floor = floor
            self.extras = {i for i in self.extras if i > floor}
        self._compact()

    def merge(self, other: Position) -> None:
        self.extras |= {i for i in other.extras if i > self.floor}
        self.raise_floor(other.floor)

    def copy(self) -> Position:
        return Position(self.floor, set(self.extras))

    def top(self) -> int:
        return max(self.extras, default=self.floor)

    def _compact(self) -> None:
        while self.floor + 1 in self.extras:
            self.floor += 1
            self.extras.discard(self.floor)

    def encode(self) -> str:
        return ".".join(str(i) for i in [self.floor, *sorted(self.extras)])

    @classmethod
    def decode(cls, text: str) -> Position:
        parts = text.split(".")
        # ASCII digits only: str.isdigit() also accepts "²", which int() then refuses.
        if len(parts) > MAX_CURSOR_EXTRAS + 1 or not all(_ROW_ID.fullmatch(p) for p in parts):
            raise CursorError(text)
        floor, *extras = (int(p) for p in parts)
        if floor > MAX_ROW_ID or any(i <= floor or i > MAX_ROW_ID for i in extras):
            raise CursorError(text)
        position = cls(floor, set(extras))
        position._compact()
        return position


def encode_cursor(events: Position, logs: Position) -> str:
    return f"{events.encode()}-{logs.encode()}"


def decode_cursor(text: str) -> tuple[Position, Position]:
    """The two positions of a cursor; ``CursorError`` when it is not one of ours."""
    event_part, sep, log_part = text.partition("-")
    if not sep:
        raise CursorError(text)
    return Position.decode(event_part), Position.decode(log_part)


def positions_of(ids: Iterable[int], floor: int = 0) -> Position:
    position = Position(floor)
    for row_id in ids:
        position.add(row_id)
    return position
