"""One WebSocket stream: handshake, catch-up from a cursor, then the live frames from the hub.

The socket's thread only ever waits on its own queue and writes to its own socket. It reads the
database twice at most, at connect (the first queue stats, and the rows a resuming client
missed), each time on a short session of its own that is closed before streaming starts.

Close codes (also in docs/STREAMS.md):
  1000 normal closure (the client closed)
  1001 going away: the server is shutting down; reconnect with your cursor
  1008 ping/pong timeout (sent by simple-websocket when a client stops answering pings)
  1011 internal error: the database could not be read at connect
  1013 try again later: this client fell too far behind; reconnect with your cursor
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flask import Response, current_app, request
from simple_websocket import ConnectionClosed, Server
from wsproto.events import TextMessage
from wsproto.frame_protocol import CloseReason

from ..errors import ApiError
from ..extensions import db
from . import frames
from .hub import Hub, HubClosed, Item, Subscriber, get_hub
from .position import Position, encode_cursor

CLOSE_GOING_AWAY = CloseReason.GOING_AWAY  # 1001
CLOSE_INTERNAL_ERROR = CloseReason.INTERNAL_ERROR  # 1011
CLOSE_TRY_AGAIN_LATER = CloseReason.TRY_AGAIN_LATER  # 1013

DEFAULT_PING_INTERVAL = 25.0
DEFAULT_SEND_TIMEOUT = 10.0
# How long a stream that sent a close frame waits for the client's answering close (or its end
# of the connection) before the connection is closed anyway.
CLOSE_REPLY_TIMEOUT = 1.0
WAKE_INTERVAL = 1.0  # how soon a socket notices shutdown or a vanished client
FRAMES_PER_WRITE = 200


@dataclass
class StreamSpec:
    """What one socket asked for (validated query parameters)."""

    kind: str  # "logs" (/api/logs/ws) or "queue" (/api/queue/ws)
    events: Position | None = None  # resume point given by the client, if any
    logs: Position | None = None
    event_type: str | None = None
    min_levelno: int | None = None
    only: str | None = None  # "log" or "message_event"

    def accepts(self, item: Item) -> bool:
        """Whether a hub item ("event"/"log") becomes a frame on this socket."""
        if self.kind == "queue":
            return item[0] == "event" and item[1].action is not None
        if item[0] == "event":
            return self.only != "log" and (not self.event_type
                                           or item[1].event_type == self.event_type)
        return self.only != "message_event" and (not self.min_levelno
                                                 or item[1].levelno >= self.min_levelno)


def serve(spec: StreamSpec) -> Response:
    """Upgrade the current request and stream until either side ends it."""
    # The app itself, not the proxy: Flask types current_app as Flask, not as a LocalProxy.
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    if not request.headers.get("Sec-WebSocket-Key") or (
            request.headers.get("Sec-WebSocket-Version") != "13"):
        raise ApiError(400, "VALIDATION_ERROR",
                       "Invalid WebSocket handshake: Sec-WebSocket-Key and "
                       "Sec-WebSocket-Version: 13 are required")
    hub = get_hub(app)
    subscriber = Subscriber(accepts=spec.accepts, wants_stats=spec.kind == "queue",
                            queue_size=hub.queue_size)
    # Subscribe before the handshake: every row committed after the client sees "101" is
    # streamed. A database that cannot be read here answers 503 (errors.py), still in HTTP.
    try:
        hub.subscribe(subscriber)
    except HubClosed:
        raise ApiError(503, "SERVICE_UNAVAILABLE",
                       "The server is shutting down; reconnect shortly") from None
    try:
        # Whatever the request hooks read (the API key, ...) must not keep a pooled connection
        # checked out for the whole life of the socket.
        db.session.remove()
        config = app.config
        ws = Server.accept(
            request.environ,
            ping_interval=float(config.get("STREAM_PING_INTERVAL", DEFAULT_PING_INTERVAL)),
            max_message_size=64 * 1024,
        )
        # A client that stops reading must not block this thread forever in a write.
        _socket_of(ws).settimeout(float(config.get("STREAM_SEND_TIMEOUT", DEFAULT_SEND_TIMEOUT)))
        close = _Stream(hub, ws, spec).run(subscriber)
    finally:
        hub.unsubscribe(subscriber)
    if close is not None and ws.connected:
        try:
            ws.close(*close)
        except (ConnectionClosed, OSError):
            pass
        else:
            # The closing handshake, on this thread and bounded: simple-websocket's reader
            # thread ends when the client answers with its close frame or closes.
            if isinstance(ws.thread, threading.Thread):  # typed as a protocol without join()
                ws.thread.join(CLOSE_REPLY_TIMEOUT)
    if ws.mode == "gunicorn":
        # Closed by the worker at once, not after gunicorn's lingering close on its main loop,
        # which waits for a client that may never answer (app/gunicorn_worker.py).
        from ..gunicorn_worker import release_websocket

        release_websocket(request.environ["gunicorn.socket"])
    return _after_socket(ws)


def _socket_of(ws: Server) -> socket.socket:
    """The connection's socket, which ``Server.accept`` has taken over (typed as optional)."""
    if ws.sock is None:
        raise ConnectionClosed()
    return ws.sock


def _after_socket(ws: Server) -> Response:
    """What the WSGI server gets back once the socket is done (as flask-sock does it)."""

    class WebSocketResponse(Response):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if ws.mode == "gunicorn":
                raise StopIteration()  # gunicorn: the connection is finished, close it
            if ws.mode == "werkzeug":
                return super().__call__(*args, **kwargs)
            return []

    return WebSocketResponse()


class _Stream:
    def __init__(self, hub: Hub, ws: Server, spec: StreamSpec) -> None:
        self.hub = hub
        self.ws = ws
        self.sock = _socket_of(ws)
        self.spec = spec
        self.events = Position()
        self.logs = Position()
        self.last_stats: str | None = None

    def run(self, subscriber: Subscriber) -> tuple[CloseReason, str] | None:
        """Stream; returns the close (code, reason) to send, or None when the peer is gone."""
        try:
            return self._stream(subscriber)
        except (ConnectionClosed, OSError):
            return None  # the client vanished or stopped reading

    def _stream(self, subscriber: Subscriber) -> tuple[CloseReason, str] | None:
        start_events, start_logs = subscriber.start_events, subscriber.start_logs
        self.events = self.spec.events.copy() if self.spec.events else start_events.copy()
        self.logs = self.spec.logs.copy() if self.spec.logs else start_logs.copy()
        try:
            if self.spec.kind == "queue":
                with self.hub.session() as session:
                    stats = frames.stats_json(frames.queue_stats(session))
                self._send([self._stats_frame(stats)])
            if self.spec.events:
                self._catch_up_events(start_events)
            if self.spec.logs and self.spec.kind == "logs":
                self._catch_up_logs(start_logs)
        except (ConnectionClosed, OSError):
            raise
        except Exception:  # noqa: BLE001 - a database error while catching up
            current_app.logger.warning("stream catch-up failed: database unavailable")
            return CLOSE_INTERNAL_ERROR, "database unavailable"
        self.events.merge(start_events)
        self.logs.merge(start_logs)
        return self._live(subscriber)

    # ------------------------------------------------------------------ catch-up

    def _catch_up_events(self, upto: Position) -> None:
        """Send the matching events the client has not seen and the hub had handed out."""
        self._catch_up(
            upto,
            self.events,
            lambda session, after: frames.event_page(
                session, after, upto.top(), event_type=self.spec.event_type,
                queue_changes_only=self.spec.kind == "queue"),
            self._event_frame,
            skip=self.spec.only == "log",
        )

    def _catch_up_logs(self, upto: Position) -> None:
        self._catch_up(
            upto,
            self.logs,
            lambda session, after: frames.log_page(session, after, upto.top(),
                                                   min_levelno=self.spec.min_levelno),
            self._log_frame,
            skip=self.spec.only == "message_event",
        )

    def _catch_up(self, upto: Position, mine: Position,
                  read_page: Callable[[Any, int], tuple[list[Any], int | None]],
                  to_frame: Callable[[Any], str | None], *, skip: bool) -> None:
        if skip:
            return
        after: int | None = mine.floor
        while after is not None:
            with self.hub.session() as session:  # one short session per page
                rows, after = read_page(session, after)
            texts = []
            for row in rows:
                if upto.covers(row.id) and not mine.covers(row.id):
                    mine.add(row.id)
                    text = to_frame(row)
                    if text:
                        texts.append(text)
            self._send(texts)

    # ------------------------------------------------------------------ live

    def _live(self, subscriber: Subscriber) -> tuple[CloseReason, str] | None:
        while True:
            if self.hub.closing:
                return CLOSE_GOING_AWAY, "server shutting down"
            if subscriber.overflowed:
                return CLOSE_TRY_AGAIN_LATER, "client too slow; reconnect with the last cursor"
            if not self.ws.connected:
                return None
            self._discard_incoming()
            try:
                items = [subscriber.queue.get(timeout=WAKE_INTERVAL)]
            except queue.Empty:
                continue
            while len(items) < FRAMES_PER_WRITE:
                try:
                    items.append(subscriber.queue.get_nowait())
                except queue.Empty:
                    break
            self._send([text for item in items if (text := self._live_frame(item))])

    def _live_frame(self, item: Item) -> str | None:
        kind = item[0]
        if kind == "event":
            row = item[1]
            if self.events.covers(row.id):
                return None  # the client had it already (resumed from a cursor)
            self.events.add(row.id)
            return self._event_frame(row)
        if kind == "log":
            row = item[1]
            if self.logs.covers(row.id):
                return None
            self.logs.add(row.id)
            return self._log_frame(row)
        if kind == "stats":
            return self._stats_frame(item[1])
        if kind == "floor":
            self.events.raise_floor(item[1])
            self.logs.raise_floor(item[2])
        return None

    # ------------------------------------------------------------------ frames

    def _cursor(self) -> str:
        return encode_cursor(self.events, self.logs)

    def _event_frame(self, row: frames.EventRow) -> str | None:
        if self.spec.kind == "queue":
            if row.queue_json is None:
                return None
            return frames.frame("queue_event", self._cursor(), row.queue_json)
        return frames.frame("message_event", self._cursor(), row.item_json)

    def _log_frame(self, row: frames.LogRow) -> str:
        return frames.frame("log", self._cursor(), row.item_json)

    def _stats_frame(self, stats: str) -> str | None:
        if stats == self.last_stats:
            return None
        self.last_stats = stats
        return frames.frame("queue_stats", self._cursor(), stats)

    def _send(self, items: Sequence[str | None]) -> None:
        texts = [t for t in items if t]
        if not texts:
            return
        if not self.ws.connected:
            raise ConnectionClosed()
        # Not simple-websocket's send(): one plain send() may write part of a frame. Nor
        # sendall(): its timeout bounds the whole write (up to FRAMES_PER_WRITE frames), so a
        # client reading steadily but slower than that would be cut off. Here the timeout
        # (STREAM_SEND_TIMEOUT) bounds each wait for room: only a write that makes no progress
        # for that long ends the stream.
        data = memoryview(b"".join(self.ws.ws.send(TextMessage(data=t)) for t in texts))
        while data:
            data = data[self.sock.send(data):]

    def _discard_incoming(self) -> None:
        """Clients have nothing to say on these streams; drop whatever they send."""
        try:
            while self.ws.receive(timeout=0) is not None:
                pass
        except ConnectionClosed:
            pass
