"""`tunebot serve`: Socket Mode by default, or HTTP on a threaded server.

HTTP mode serves Events, slash commands and interactivity on /slack/events
(signature checked by Bolt) and GET /healthz. Each request gets its own
thread, so a slow client never holds up Slack's 3-second acks.
"""

from __future__ import annotations

import gc
import logging
import signal
import socketserver
import sys
import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from bot.config import Settings
from bot.priority import ACKS

log = logging.getLogger("tunebot")

EVENTS_PATH = "/slack/events"
SWITCH_INTERVAL_SECONDS = 0.0005  # the interpreter's default is 0.005


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the default backlog of 5 resets bursts of Slack deliveries


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # one log line per event is ours
        log.debug("http %s", format % args)


def wsgi_app(app) -> Callable:
    from slack_bolt.adapter.wsgi import SlackRequestHandler

    bolt = SlackRequestHandler(app, path=EVENTS_PATH)

    def route(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "")
        if path == "/healthz" and method == "GET":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == EVENTS_PATH and method == "POST":
            with ACKS.ack():  # from the first byte read (bot.priority)
                return bolt(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return route


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr, force=True
    )
    for noisy in ("slack_bolt", "slack_sdk"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str) -> int:
    """Every start-up problem: one line on stderr, exit code 2, no traceback."""
    print(f"tunebot serve: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def _check_prices(settings: Settings) -> str | None:
    """What is wrong with TUNEBOT_PRICES, TUNEBOT_DEFAULT_MODEL or TUNEBOT_PROVIDERS,
    before anything starts."""
    from trainers.pricing import PriceTable

    try:
        table = PriceTable.from_file(settings.prices_file) if settings.prices_file else PriceTable()
    except ValueError as exc:
        return f"TUNEBOT_PRICES: {exc}"
    try:
        table.resolve(settings.default_model)
    except ValueError as exc:  # UnknownModel
        return f"TUNEBOT_DEFAULT_MODEL: {exc}"
    from trainers.providers import ProvidersFileError, load_optional

    try:
        load_optional(settings.providers_file)
    except ProvidersFileError as exc:
        return f"TUNEBOT_PROVIDERS: {exc}"
    return None


def serve(settings: Settings, *, http: bool, host: str, port: int) -> int:
    import sqlite3

    from slack_bolt.error import BoltError
    from slack_sdk.errors import SlackApiError

    from bot.app import create_app, make_client
    from bot.workflow import Workflow
    from storage import BlobStore, HomeLock, HomeLocked, SchemaTooNew, Store

    if not settings.slack_bot_token:
        return _fail("SLACK_BOT_TOKEN is not set (the bot token, xoxb-…)")
    if http and not settings.slack_signing_secret:
        return _fail("SLACK_SIGNING_SECRET is not set; HTTP mode needs it to verify requests")
    if not http and not settings.slack_app_token:
        return _fail("SLACK_APP_TOKEN is not set; set it for Socket Mode, or use --http")
    if not http and not settings.slack_app_token.startswith("xapp-"):
        return _fail("SLACK_APP_TOKEN must be an app-level token (xapp-…)")

    problem = _check_prices(settings)
    if problem:
        return _fail(problem)

    configure_logging()
    # Acks wait on sockets and SQLite; job threads may run pure Python for a while
    # (splitting a dataset, rendering a Home tab). A short switch interval hands the
    # GIL back to a waiting ack sooner (bench/ack.py on a busy 2-core machine: help
    # p99 while validating 199 -> 83 ms, Reject-click p99 1,476 -> 840 ms).
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    lock = HomeLock(settings.home)
    try:
        lock.acquire()
    except HomeLocked as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot use TUNEBOT_HOME {settings.home}: {exc.strerror or exc}")
    try:
        store = Store.in_home(settings.home)
    except SchemaTooNew as exc:
        lock.release()
        return _fail(f"the database was written by a newer tunebot: {exc}")
    except (sqlite3.Error, OSError) as exc:
        lock.release()
        return _fail(f"cannot open the database in TUNEBOT_HOME {settings.home}: {exc}")
    scheduler = None
    try:
        workflow = Workflow(
            settings, store, BlobStore(settings.home / "blobs"), make_client(settings)
        )
    except (ValueError, OSError) as exc:  # the price table, the blob folder
        store.close()
        lock.release()
        return _fail(str(exc))
    try:
        try:
            app = create_app(settings, workflow)
        except (BoltError, SlackApiError) as exc:
            return _fail(f"Slack refused SLACK_BOT_TOKEN: {_slack_reason(exc)}")
        except OSError as exc:
            return _fail(f"cannot reach Slack at {settings.slack_api_url}: {exc}")
        _stop_on_sigterm()
        if settings.openai_api_key:
            # Imported by the first paid run's job thread otherwise: half a second
            # of the GIL taken from the acks of that moment (bench/ack.py).
            import openai  # noqa: F401
        # What start-up made lives as long as the process: out of the collector's
        # way, so that a full collection (a pause for every thread) stays short.
        gc.freeze()
        workflow.resume()  # file checks, clicks and pricing acked before the last stop
        from bot.scheduler import start_scheduler

        scheduler = start_scheduler(workflow.runs, settings)
        if http:
            return _serve_http(app, host, port)
        return _serve_socket_mode(app, settings)
    except KeyboardInterrupt:
        log.info("stopping")
        return 0
    finally:
        if scheduler is not None:
            scheduler.shutdown(wait=False)
        workflow.close()  # what was acked gets a bounded time; the rest resumes at the next start
        store.close()
        lock.release()


def _serve_http(app, host: str, port: int) -> int:
    try:
        server = make_server(
            host, port, wsgi_app(app), server_class=ThreadingWSGIServer, handler_class=_QuietHandler
        )
    except OSError as exc:
        return _fail(f"cannot listen on {host}:{port}: {exc.strerror}")
    with server:
        log.info("listening on http://%s:%d", host, server.server_address[1])
        server.serve_forever(poll_interval=0.2)
    return 0


def _serve_socket_mode(app, settings: Settings) -> int:
    from slack_bolt.adapter.socket_mode import SocketModeHandler

    handler = SocketModeHandler(app, settings.slack_app_token)
    try:
        handler.connect()
    except Exception as exc:  # the SDK raises several types for a refused token
        return _fail(f"Slack refused SLACK_APP_TOKEN: {_slack_reason(exc)}")
    log.info("connected to Slack over Socket Mode")
    try:
        threading.Event().wait()
    finally:
        handler.close()
    return 0


def _slack_reason(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if response is not None and hasattr(response, "get"):
        return str(response.get("error") or exc)
    text = str(exc)
    for reason in ("invalid_auth", "not_authed", "account_inactive", "token_revoked"):
        if reason in text:
            return reason
    return text.splitlines()[0] if text else type(exc).__name__


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds to serve(), which closes the store and releases the lock


def _stop_on_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
