"""Stream positions and cursors, and the hub's bookkeeping of ids that commit out of order."""

from __future__ import annotations

import pytest

from app.stream.hub import MAX_HOLES, _Table
from app.stream.position import CursorError, Position, decode_cursor, encode_cursor


def test_position_compacts_contiguous_ids():
    position = Position(10)
    position.add(12)
    assert (position.floor, position.extras) == (10, {12})
    assert position.covers(12) and not position.covers(11) and position.covers(3)
    position.add(11)
    assert (position.floor, position.extras) == (12, set())


def test_cursor_round_trip():
    events, logs = Position(120, {123, 125}), Position(87)
    text = encode_cursor(events, logs)
    assert text == "120.123.125-87"
    assert decode_cursor(text) == (events, logs)


@pytest.mark.parametrize("text", ["", "12", "a-1", "1-b", "5.3-1", "1..2-3", "-1-2", "1-2-3",
                                  "1" * 25 + "-1"])
def test_foreign_cursors_are_refused(text):
    with pytest.raises(CursorError):
        decode_cursor(text)


def test_merge_and_raise_floor():
    mine = Position(5, {9})
    mine.merge(Position(7, {8, 11}))
    assert (mine.floor, mine.extras) == (9, {11})
    mine.raise_floor(20)
    assert (mine.floor, mine.extras) == (20, set())


def test_table_waits_for_holes_then_gives_up():
    table = _Table(10)
    table.accept([11, 13], now=0.0)
    assert table.holes == {12: 0.0}
    assert table.position.floor == 11
    table.accept([12], now=1.0)  # the late commit arrives
    assert table.holes == {} and table.position.floor == 13
    table.accept([15], now=2.0)
    table.expire_holes(now=30.0, timeout=60.0)
    assert 14 in table.holes
    table.expire_holes(now=62.0, timeout=60.0)  # rolled back: stop waiting
    assert table.holes == {} and table.position.floor == 15


def test_table_treats_a_huge_jump_as_a_sequence_jump():
    table = _Table(0)
    table.accept([MAX_HOLES * 3], now=0.0)
    assert len(table.holes) == MAX_HOLES
    assert table.position.covers(MAX_HOLES * 3)
