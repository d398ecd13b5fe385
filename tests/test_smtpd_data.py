"""The listener reads DATA in chunks (``protocol.read_data``): for any data, in any split into
TCP segments, it must take exactly what aiosmtpd's line-by-line loop takes: the same bytes,
the same dot-unstuffing, the same 500 / 552 replies, and not one byte past the end-of-data line.
aiosmtpd itself (a plain server on loopback) is the reference."""

from __future__ import annotations

import asyncio
import random
import smtplib
import socket

import pytest
from aiosmtpd.smtp import SMTP

from app.smtpd.protocol import DATA_CHUNK, DataTooLong, DataTooMuch, _has_long_line, read_data
from tests.smtpd_helpers import queued_id, raw_of, running_listener, stored

SIZE_LIMIT = 3000
RNG = random.Random(13)


def _random_lines(count: int) -> bytes:
    """Lines full of dots, CRs and LFs, with no end-of-data line before the last."""
    while True:
        lines = []
        for _ in range(count):
            start = RNG.choice([b"", b"", b"", b".", b"..", b"\r", b"\n", b"x.", b". "])
            lines.append(start + bytes(RNG.choice(b"ab.\r\n ")
                                       for _ in range(RNG.randrange(0, 90))))
        wire = b"\r\n".join(lines) + b"\r\n.\r\n"
        if (b"\r\n" + wire).find(b"\r\n.\r\n") == len(wire) - 3:
            return wire


# What a client sends after the 354, the end-of-data line included.
WIRES = [
    b".\r\n",
    b"\r\n.\r\n",
    b"\r\n\r\n.\r\n",
    b"..\r\n.\r\n",
    b"...\r\n.\r\n",
    b".x\r\n.\r\n",
    b"a\r\n..b\r\n.c\r\n\r\n.\r\n",
    b"x\n.\r\n.\r\n",  # a bare LF before a dot does not end the data
    b"x\r\n.\r\r\n.\r\n",
    b"x\r\r\n.\r\n",
    b"\r\n.\r\r\n..\r\n.\r\n",
    b"a\r\n.\r\n",
    b"z" * 998 + b"\r\n.\r\n",  # 1000 octets with the CRLF: allowed
    b"z" * 999 + b"\r\n.\r\n",
    b"z" * 1000 + b"\r\n.\r\n",  # 1002: too long
    b"ab\r\n" + b"z" * 1000 + b"\r\n.\r\n",
    b"ab\r\n" + b"z" * 999 + b"\r\n.\r\n",
    b"ab\r" + b"z" * 1000 + b"\r\n.\r\n",
    b".\r\n".join([b"y" * 1200, b""]) + b"\r\n.\r\n",
    b"w" * (SIZE_LIMIT - 2) + b"\r\n.\r\n",  # exactly the size limit
    b"w" * (SIZE_LIMIT - 1) + b"\r\n.\r\n",  # one octet over
    (b"v" * 70 + b"\r\n") * 60 + b".\r\n",  # over the limit, lines fine: 552
    b"u" * 1500 + b"\r\n" + (b"v" * 70 + b"\r\n") * 60 + b".\r\n",  # too long first: 500
    _random_lines(20),
    _random_lines(30),
]


def aiosmtpd_takes(wire: bytes) -> tuple[int, bytes | None]:
    """(reply code, content) from a plain aiosmtpd server for ``wire`` after DATA."""
    taken: list[bytes] = []

    class Keep:
        async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
            taken.append(envelope.original_content)
            return "250 OK"

    async def main() -> tuple[int, bytes | None]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(Keep(), data_size_limit=SIZE_LIMIT, decode_data=False),
            "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            code = await loop.run_in_executor(None, _send, port, wire)
        finally:
            server.close()
        return code, (taken[0] if taken else None)

    return asyncio.run(main())


def _send(port: int, wire: bytes) -> int:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        client.mail("a@example.com")
        client.rcpt("b@example.net")
        client.putcmd("DATA")
        assert client.getreply()[0] == 354
        client.send(wire)
        return client.getreply()[0]


def read_data_takes(wire: bytes, limit: int, pieces: list[int]) -> tuple[int, bytes | None, bytes]:
    """(reply code, content, what is left in the reader) from ``read_data``, with ``wire``
    (and a pipelined QUIT) arriving in pieces of the given sizes."""

    async def main() -> tuple[int, bytes | None, bytes]:
        reader = asyncio.StreamReader(limit=limit)
        stream = wire + b"QUIT\r\n"

        async def feed() -> None:
            at = 0
            for size in pieces:
                reader.feed_data(stream[at:at + size])
                at += size
                await asyncio.sleep(0)
            reader.feed_data(stream[at:])
            reader.feed_eof()

        feeding = asyncio.create_task(feed())
        try:
            content: bytes | None = await read_data(reader, SIZE_LIMIT, SMTP.line_length_limit)
            code = 250
        except DataTooLong:
            code, content = 500, None
        except DataTooMuch:
            code, content = 552, None
        await feeding
        return code, content, await reader.read()

    return asyncio.run(main())


def splits(wire: bytes) -> list[list[int]]:
    rng = random.Random(len(wire))
    return [[len(wire) + 6], [1] * (len(wire) + 6), [rng.randrange(1, 8) for _ in range(400)],
            [rng.randrange(1, 300) for _ in range(100)]]


@pytest.mark.parametrize("wire", WIRES, ids=range(len(WIRES)))
def test_chunked_data_reading_takes_what_aiosmtpd_takes(wire):
    expected = aiosmtpd_takes(wire)
    for limit in (16, 64, DATA_CHUNK):
        for pieces in splits(wire):
            code, content, left = read_data_takes(wire, limit, pieces)
            assert (code, content) == expected, (limit, pieces[:5])
            assert left == b"QUIT\r\n"


def test_a_dot_stuffed_message_in_small_segments_is_stored_unstuffed(app):
    wire = (b"From: a@example.com\r\nSubject: dots\r\n\r\n..\r\n...leading\r\n.\r\r\n"
            b"end\r\n.\r\n")
    with running_listener(app) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"HELO client.example\r\nMAIL FROM:<a@example.com>\r\n"
                     b"RCPT TO:<b@example.net>\r\nDATA\r\n")
        replies = [reader.readline() for _ in range(4)]
        assert replies[-1].startswith(b"354")
        for at in range(0, len(wire), 3):
            sock.sendall(wire[at:at + 3])
        sock.sendall(b"QUIT\r\n")  # pipelined right behind the end of data
        queued, bye = reader.readline(), reader.readline()
    assert queued.startswith(b"250 ") and bye.startswith(b"221")
    raw = raw_of(app, queued_id(queued[4:].strip()))
    assert raw.endswith(b"\r\n\r\n.\r\n..leading\r\n\r\r\nend\r\n")


def test_the_long_line_check_finds_exactly_the_lines_over_1000_octets():
    rng = random.Random(1000)
    for _ in range(3000):
        pieces = [bytes(rng.choice(b"x\r\n") for _ in range(rng.randrange(0, 4)))
                  + b"y" * rng.choice([0, 1, 400, 997, 998, 999, 1000, 1500])
                  for _ in range(rng.randrange(1, 6))]
        data = b"".join(pieces)
        longest = max(len(line) for line in data.split(b"\r\n"))
        assert _has_long_line(data, SMTP.line_length_limit) == (longest + 2 > 1001), data


PATHS = ["<bench@example.com>", "<bench@example.com> SIZE=100", "<a.b@c.d>", "<a..b@c>",
         '<"q x"@c>', "<a@[1.2.3.4]>", "<@x:a@b>", "<>", "< a@b >", "<a@b>x", "<a@b.>",
         "<.a@b>", "<A+b@EX-1.com>  BODY=8BITMIME", "<a@b> SIZE=100 ", "<a@b>\tX",
         "<a@b> (c) X", "<a@b>(c)", "<a@b>  ", '<a@b> "x"', "a@b", " <a@b>", "<a@b",
         "<用户@例子.测试> SMTPUTF8", "<a@b@c>", "<a b@c>", "<" + "l" * 70 + "@example.com>",
         "", "<a@-b.c>", "<a@b..c>", "<a@b> SIZE=1 BODY=8BITMIME SMTPUTF8"]


def test_paths_are_read_as_aiosmtpd_reads_them():
    """The listener's ``_getaddr`` skips aiosmtpd's per-call class and, for plain paths, the
    header parser: the address and the rest must be exactly aiosmtpd's."""
    from app.smtpd.protocol import ElemtaSMTP

    ours, theirs = ElemtaSMTP.__new__(ElemtaSMTP), SMTP.__new__(SMTP)
    rng = random.Random(5321)
    alphabet = "ab.@<>\" ()[]:-+=\t"
    generated = ["<" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 14)))
                 + rng.choice([">", "> X", ">  A=1", ""]) for _ in range(3000)]
    for path in PATHS + generated:
        assert outcome(ours._getaddr, path) == outcome(theirs._getaddr, path), path


def outcome(read, path):  # type: ignore[no-untyped-def]
    """The result, or the exception's type: the e-mail parser raises IndexError on some
    broken paths, and so must the listener then (aiosmtpd answers it as an error)."""
    try:
        return read(path)
    except Exception as exc:
        return type(exc)


def test_a_client_gone_in_the_middle_of_data_leaves_nothing_and_the_listener_serves_on(app):
    with running_listener(app) as port:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(b"HELO client.example\r\nMAIL FROM:<a@example.com>\r\n"
                         b"RCPT TO:<b@example.net>\r\nDATA\r\n")
            assert [reader.readline() for _ in range(4)][-1].startswith(b"354")
            sock.sendall(b"Subject: cut off\r\n\r\n" + b"half a message\r\n" * 1000 + b"\r\n.")
        with smtplib.SMTP("127.0.0.1", port) as client:
            assert client.sendmail("a@example.com", ["c@example.net"],
                                   b"Subject: whole\r\n\r\nfine\r\n") == {}
    (message,) = stored(app)["messages"]
    assert message.subject == "whole"
