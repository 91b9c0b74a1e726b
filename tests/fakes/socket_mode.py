"""A fake Slack Socket Mode endpoint: a websockets sync server on 127.0.0.1.

The real flow, which slack_sdk's built-in SocketModeClient follows and this fake
serves: the app calls ``apps.connections.open`` with its ``xapp-`` token, gets a
``wss://…/link/?ticket=…`` URL, connects, and receives ``{"type": "hello"}``.
Slack then pushes envelopes (``events_api``, ``slash_commands``, ``interactive``)
and the app acks each one with ``{"envelope_id": …, "payload": …}``. A
``{"type": "disconnect"}`` message makes the client fetch a new URL and reconnect.

Wiring with Bolt: ``SocketModeHandler(app, app_token)`` builds its SocketModeClient
with ``web_client=app.client``, so an ``App(client=WebClient(base_url=slack.base_url))``
already reaches ``FakeSlack``'s ``apps.connections.open``, which returns this
server's URL once attached (``FakeSocketMode(slack)`` attaches itself).

Close the app's handler before this server: closing the server first sends a
close frame, and the client's auto-reconnect then keeps dialling a dead port.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve

if TYPE_CHECKING:
    from tests.fakes.slack_api import FakeSlack

# Interaction payload types whose ack may carry a response (e.g. view errors, options).
_INTERACTIVE_WITH_RESPONSE = frozenset({"view_submission", "block_suggestion"})


class FakeSocketMode:
    """Slack's side of a Socket Mode connection, for the app under test to dial."""

    def __init__(
        self, slack: FakeSlack | None = None, *, app_id: str = "A1", ping_interval: float = 0.1
    ) -> None:
        self.app_id = app_id
        # Slack pings its clients too. A short interval matters for speed: the SDK's
        # client closes a session only after its blocking recv() returns, which
        # without traffic takes its 3 s socket timeout (on every reconnect and close).
        self.ping_interval = ping_interval
        self.received: list[dict[str, Any]] = []  # every JSON message the client sent
        self.acks: dict[str, dict[str, Any]] = {}
        self.connections_opened = 0
        self._sent_at: dict[str, float] = {}
        self._acked_at: dict[str, float] = {}
        self._open: list[ServerConnection] = []
        self._tickets = itertools.count(1)
        self._cond = threading.Condition()
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        if slack is not None:
            slack.attach_socket_mode(self)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> FakeSocketMode:
        if self._server is not None:
            return self
        self._server = serve(
            self._serve_connection,
            "127.0.0.1",
            0,
            process_request=_only_link_paths,
            compression=None,  # the SDK's built-in client never negotiates it anyway
            ping_interval=self.ping_interval,
            close_timeout=1,
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.name = "fake-socket-mode"
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeSocketMode:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeSocketMode is not started")
        return int(self._server.socket.getsockname()[1])

    def new_url(self) -> str:
        """A fresh connection URL, shaped like the one apps.connections.open returns."""
        return f"ws://127.0.0.1:{self.port}/link/?ticket={next(self._tickets)}&app_id={self.app_id}"

    # -- driving the client ------------------------------------------------------

    def wait_connected(self, count: int = 1, timeout: float = 5.0) -> None:
        """Block until ``count`` connections have been opened since start."""
        self._wait(lambda: self.connections_opened >= count, timeout, f"{count} connection(s)")

    def send_envelope(
        self,
        type: str = "slash_commands",
        payload: dict[str, Any] | None = None,
        envelope_id: str | None = None,
        accepts_response_payload: bool | None = None,
        retry_attempt: int | None = None,
        retry_reason: str | None = None,
        timeout: float = 5.0,
    ) -> str:
        """Push an envelope to the newest open connection; return its envelope_id.

        Defaults follow Slack: ``accepts_response_payload`` is true for slash commands
        and for view_submission / block_suggestion interactions; ``retry_attempt`` and
        ``retry_reason`` are sent only with ``events_api`` (0 and "" on first delivery).
        """
        payload = payload or {}
        envelope_id = envelope_id or str(uuid.uuid4())
        if accepts_response_payload is None:
            accepts_response_payload = type == "slash_commands" or (
                type == "interactive" and payload.get("type") in _INTERACTIVE_WITH_RESPONSE
            )
        envelope: dict[str, Any] = {
            "envelope_id": envelope_id,
            "payload": payload,
            "type": type,
            "accepts_response_payload": accepts_response_payload,
        }
        if type == "events_api" or retry_attempt is not None:
            envelope["retry_attempt"] = retry_attempt or 0
            envelope["retry_reason"] = retry_reason or ""
        with self._cond:
            self._sent_at[envelope_id] = time.monotonic()
        self._send(envelope, timeout)
        return envelope_id

    def send_disconnect(self, reason: str = "refresh_requested", timeout: float = 5.0) -> None:
        """Ask the client to reconnect, as Slack does every few hours."""
        self._send({"type": "disconnect", "reason": reason, "debug_info": _debug_info()}, timeout)

    def wait_for_ack(self, envelope_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """Block until the client acks ``envelope_id``; return the ack message."""
        self._wait(lambda: envelope_id in self.acks, timeout, f"an ack for {envelope_id}")
        with self._cond:
            return self.acks[envelope_id]

    def ack_latency(self, envelope_id: str) -> float:
        """Seconds between sending an envelope and its ack (Slack allows 3)."""
        with self._cond:
            return self._acked_at[envelope_id] - self._sent_at[envelope_id]

    # -- plumbing --------------------------------------------------------------

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not ready():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {what} within {timeout}s")
                self._cond.wait(left)

    def _send(self, message: dict[str, Any], timeout: float) -> None:
        self._wait(lambda: bool(self._open), timeout, "open Socket Mode connection")
        with self._cond:
            connection = self._open[-1]
        connection.send(json.dumps(message))

    def _serve_connection(self, connection: ServerConnection) -> None:
        with self._cond:
            self._open.append(connection)
            self.connections_opened += 1
            count = len(self._open)
            self._cond.notify_all()
        try:
            connection.send(
                json.dumps(
                    {
                        "type": "hello",
                        "num_connections": count,
                        "debug_info": _debug_info(),
                        "connection_info": {"app_id": self.app_id},
                    }
                )
            )
            for raw in connection:
                self._on_message(raw)
        except ConnectionClosed:
            pass
        finally:
            with self._cond:
                self._open.remove(connection)
                self._cond.notify_all()

    def _on_message(self, raw: str | bytes) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            return  # Slack ignores junk frames too; the test will notice a missing ack
        if not isinstance(message, dict):
            return
        with self._cond:
            self.received.append(message)
            envelope_id = message.get("envelope_id")
            if isinstance(envelope_id, str):
                self.acks[envelope_id] = message
                self._acked_at[envelope_id] = time.monotonic()
            self._cond.notify_all()


def _only_link_paths(connection: ServerConnection, request: Request) -> Response | None:
    # The SDK's client requests "/link/?ticket=…" (it always appends "?" + query).
    if not urlsplit(request.path).path.startswith("/link"):
        return connection.respond(404, "not a Socket Mode URL\n")
    return None


def _debug_info() -> dict[str, Any]:
    return {"host": "fake-applink-1", "build_number": 1, "approximate_connection_time": 18060}
