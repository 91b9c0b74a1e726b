"""Hostile input: links off Slack, secrets in the worker, mrkdwn in names, formulas in CSVs.

Driven like the rest of the bot's tests: signed HTTP requests in, the fake
Slack (and a second local server playing "another host") out.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from bot import render
from tests.bot.test_runs import click, request, submit_reason, upload
from tests.conftest import training_file
from tests.fakes.local_server import LocalHTTPServer
from tests.fakes.signing import file_share_message_event
from tests.fakes.slack_api import DOWNLOAD
from trainers import evaluate as ev
from trainers import local

# --- another host ----------------------------------------------------------------


class OtherHost(LocalHTTPServer):
    """A plain HTTP server on 127.0.0.1 that serves one body and records every request's headers."""

    thread_name = "other-host-http"

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body
        self.requests: list[dict[str, str]] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"{self._root()}/"

    @property
    def host(self) -> str:
        return self._root().removeprefix("http://")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        other = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with other._lock:
                    other.requests.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(other.body)))
                self.end_headers()
                self.wfile.write(other.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


@pytest.fixture
def other_host():
    with OtherHost(training_file(12)) as server:
        yield server


def share(bot, file: dict) -> dict:
    assert bot.event(file_share_message_event(file), event_id=f"Ev{file['id']}") == 200
    bot.wait_idle()
    return file


def thread(bot, file: dict) -> list[dict]:
    return bot.slack.messages(channel="C1", thread_ts=file["shares"]["public"]["C1"][0]["ts"])


def shown(message: dict) -> str:
    """Everything Slack would parse in a message: its text and its blocks."""
    return message["text"] + json.dumps(message.get("blocks") or [], ensure_ascii=False)


def pointed_at(bot, url: str, name: str = "support.jsonl") -> dict:
    """A file object as Slack would describe it, with its links replaced by `url`."""
    file = bot.slack.add_file(training_file(12), name=name)
    file["url_private"] = file["url_private_download"] = url
    return file


# --- 1. downloads come only from Slack's file hosts over https ----------------------


def test_a_link_to_another_host_is_refused_and_never_gets_the_token(bot, other_host):
    file = share(bot, pointed_at(bot, other_host.url + "support.jsonl"))
    assert other_host.requests == []  # refused before a byte was sent
    (reply,) = thread(bot, file)
    assert (
        "support.jsonl is not a Slack file link; tunebot only downloads from files.slack.com"
        in reply["text"]
    )
    assert "Traceback" not in reply["text"] and bot.store.datasets() == []


@pytest.mark.parametrize(
    "url",
    [
        "file://{tmp}/secret.jsonl",
        "ftp://127.0.0.1/support.jsonl",
        'data:application/json,{{"messages":[]}}',
        "http://files.slack.com/files-pri/T1-F1/download/support.jsonl",  # https only
        "https://files.slack.com.evil.example/files-pri/T1-F1/support.jsonl",
        "https://files.slack.com@evil.example/files-pri/T1-F1/support.jsonl",
        "https://files.slack.com:8443/files-pri/T1-F1/support.jsonl",
    ],
)
def test_other_schemes_and_lookalike_hosts_are_refused(bot, tmp_path, url):
    secret = tmp_path / "secret.jsonl"
    secret.write_bytes(training_file(12))
    file = share(bot, pointed_at(bot, url.format(tmp=tmp_path)))
    (reply,) = thread(bot, file)
    assert "is not a Slack file link; tunebot only downloads from files.slack.com" in reply["text"]
    assert "Traceback" not in reply["text"] and str(tmp_path) not in reply["text"]
    assert bot.store.datasets() == [] and not bot.slack.calls_to(DOWNLOAD)


def test_a_redirect_to_a_host_not_named_is_refused(bot, other_host):
    bot.slack.redirect_downloads = other_host.url + "support.jsonl"
    file = share(bot, bot.slack.add_file(training_file(12), name="support.jsonl"))
    (download,) = bot.slack.calls_to(DOWNLOAD)
    assert download.headers["authorization"] == f"Bearer {bot.slack.bot_token}"
    assert other_host.requests == []  # plain http to another host: not followed at all
    (reply,) = thread(bot, file)
    assert "Could not download support.jsonl: Slack redirected it" in reply["text"]
    assert "not a Slack file link" in reply["text"] and bot.store.datasets() == []


def test_a_redirect_to_another_host_is_followed_without_the_token(make_bot, other_host):
    # Even a host named in TUNEBOT_SLACK_FILE_HOSTS gets no token after a redirect.
    bot = make_bot(slack_file_hosts=("files.slack.com", other_host.host))
    bot.slack.redirect_downloads = other_host.url + "support.jsonl"
    share(bot, bot.slack.add_file(b"{}\n", name="support.jsonl"))
    (download,) = bot.slack.calls_to(DOWNLOAD)
    assert download.headers["authorization"] == f"Bearer {bot.slack.bot_token}"
    (followed,) = other_host.requests
    assert "authorization" not in followed
    assert bot.slack.bot_token not in json.dumps(followed)
    (dataset,) = bot.store.datasets()  # the body came from the other host
    assert bot.workflow.blobs.path(dataset.sha256).read_bytes() == training_file(12)


def test_a_named_loopback_host_may_serve_files_over_http(make_bot, other_host):
    bot = make_bot(slack_file_hosts=(other_host.host,))
    share(bot, pointed_at(bot, other_host.url + "support.jsonl"))
    (request_,) = other_host.requests
    assert request_["authorization"] == f"Bearer {bot.slack.bot_token}"
    assert len(bot.store.datasets()) == 1


# --- 2. workers carry no secrets -----------------------------------------------------

SECRETS = {
    "SLACK_BOT_TOKEN": "xoxb-secret",
    "SLACK_APP_TOKEN": "xapp-secret",
    "SLACK_SIGNING_SECRET": "signing-secret",
    "OPENAI_API_KEY": "sk-secret",
    "HF_TOKEN": "hf_secret",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "TUNEBOT_APPROVERS": "UA",
    "HTTPS_PROXY": "http://user:password@proxy.example:3128",
    "TORCH_SNEAKY_TOKEN": "torch-secret",  # an allowed prefix, a secret's name
}
NEEDED = {
    "HF_HOME": "/tmp/hf",
    "HF_HUB_OFFLINE": "1",
    "CUDA_VISIBLE_DEVICES": "0",
    "NCCL_DEBUG": "WARN",
    "OMP_NUM_THREADS": "2",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "ACCELERATE_MIXED_PRECISION": "no",
    "LC_ALL": "C.UTF-8",
}


def test_the_worker_process_inherits_no_secrets(tmp_path, monkeypatch):
    # A sitecustomize on PYTHONPATH (which the worker keeps) dumps the worker's environment.
    hook = tmp_path / "hook"
    hook.mkdir()
    dump = tmp_path / "environ.json"
    (hook / "sitecustomize.py").write_text(
        f"import json, os\nopen({str(dump)!r}, 'w').write(json.dumps(dict(os.environ)))\n"
    )
    for name, value in {**SECRETS, **NEEDED, "PYTHONPATH": str(hook)}.items():
        monkeypatch.setenv(name, value)
    run_dir = tmp_path / "run"
    worker = local.launch(run_dir, {"run_id": "r1", "output_dir": str(run_dir)})
    try:
        deadline = time.monotonic() + 60
        while not dump.exists():
            assert time.monotonic() < deadline, "the worker never started Python (no dump)"
            time.sleep(0.1)
        environ = json.loads(dump.read_text())
    finally:
        if local.alive(worker):
            os.killpg(worker.pid, signal.SIGKILL)
    leaked = sorted(set(SECRETS) & set(environ))
    assert leaked == []
    for value in SECRETS.values():
        assert value not in json.dumps(environ)
    assert {k: environ.get(k) for k in NEEDED} == NEEDED
    assert environ["PATH"] == os.environ["PATH"] and environ["PYTHONPATH"] == str(hook)


def test_worker_env_keeps_only_the_allowlist():
    env = local.worker_env({**SECRETS, **NEEDED, "PATH": "/usr/bin", "NCCL_IB_PKEY": "1"})
    assert env == {**NEEDED, "PATH": "/usr/bin", "NCCL_IB_PKEY": "1"}
    assert local.launch.__doc__ and "worker_env" in local.launch.__doc__
    for name in ("PATH", "HF_HOME", "CUDA_*", "ACCELERATE_*"):
        assert name in local.worker_env.__doc__


# --- 3. text is escaped -----------------------------------------------------------------


def test_a_file_name_cannot_ping_the_channel(bot):
    file = bot.slack.add_file(training_file(12, bad_lines=1), name="<!channel> data.jsonl")
    share(bot, file)
    (reply,) = thread(bot, file)
    assert reply["text"].startswith("&lt;!channel&gt; data.jsonl (d1): 13 examples")
    assert "<!channel>" not in shown(reply) and "&lt;!channel&gt;" in json.dumps(reply["blocks"])
    _, listing = bot.command("datasets")
    assert "&lt;!channel&gt; data.jsonl" in listing["text"] and "<!channel>" not in str(listing)
    assert "<@U1>" in listing["text"]  # the bot's own mentions stay mentions
    _, answer = bot.command("<!everyone>")
    assert "<!everyone>" not in str(answer)


def test_a_reject_reason_cannot_ping_the_channel(paid_bot):
    bot = paid_bot()
    upload(bot)
    request(bot)
    click(bot, "UB", "reject_run")
    assert submit_reason(bot, "UB", "<!here> no & <b>never</b>") == 200
    bot.wait_idle()
    assert bot.store.get_run("r1").status == "rejected"
    messages = bot.slack.messages(channel="C1")
    assert all("<!here>" not in shown(m) for m in messages)
    (note,) = [m for m in messages if "was rejected by" in m["text"]]
    assert (
        note["text"]
        == "<@UR> r1 was rejected by <@UB>: &lt;!here&gt; no &amp; &lt;b&gt;never&lt;/b&gt;."
    )
    card = next(m for m in messages if m["ts"] == bot.store.get_run("r1").card_ts)
    assert "Rejected by <@UB>: &lt;!here&gt; no &amp; &lt;b&gt;never&lt;/b&gt;" in card["text"]


def test_escape_is_idempotent_and_keeps_the_bots_mentions():
    assert render.escape("<!channel> & <x>") == "&lt;!channel&gt; &amp; &lt;x&gt;"
    assert render.escape(render.escape("a & <b>")) == render.escape("a & <b>")
    note = render.note("<@U1> asked in <#C1>: <!here> & <https://evil|click>")
    assert note.text == "<@U1> asked in <#C1>: &lt;!here&gt; &amp; &lt;https://evil|click&gt;"
    assert note.blocks[0]["text"]["text"] == note.text


def test_evaluation_texts_are_escaped_and_csv_formulas_neutralised():
    examples = [
        ev.EvalExample(
            i,
            [{"role": "user", "content": f"<!channel> question {i}"}],
            '=HYPERLINK("http://x")' if i == 0 else f"@SUM(A{i})",
        )
        for i in range(3)
    ]
    result = ev.score(examples, ["-2+3", "+1", "\tx"], ["<!here> tuned", "=1+1", "ok"])
    rows = list(csv.DictReader(io.StringIO(result.rows_csv().decode("utf-8"))))
    assert rows[0]["reference"] == "'" + '=HYPERLINK("http://x")'  # starts with '=
    assert rows[1]["reference"] == "'@SUM(A1)"
    assert [r["base"] for r in rows] == ["'-2+3", "'+1", "'\tx"]
    assert rows[1]["tuned"] == "'=1+1" and rows[0]["tuned"] == "<!here> tuned"
    assert all(not r[k].startswith("'") for r in rows for k in r if k.endswith(("_base", "_tuned")))

    class Run:
        id, model = "r1", "<!channel>-model"

    message = render.eval_summary(Run(), result, cost_usd=0.0)
    everything = message.text + json.dumps(message.blocks)
    assert "<!channel>" not in everything and "<!here>" not in everything
    assert "&lt;!here&gt; tuned" in message.text and "`&lt;!channel&gt;-model`" in message.text


# --- 4. failures told in words --------------------------------------------------------

TRACEBACK = """step 3
Traceback (most recent call last):
  File "/srv/tunebot/trainers/lora.py", line 1050, in main
    result = run(spec, stop, progress)
FileNotFoundError: train_file: /srv/tunebot/home/runs/r1/train.jsonl does not exist
"""


def test_errors_carry_no_traceback_and_no_server_path(bot):
    message = render.error("Training failed:\n" + TRACEBACK, "See /etc/tunebot/prices.json")
    assert "Traceback" not in message.text and "/srv" not in message.text
    assert "FileNotFoundError: train_file: train.jsonl does not exist" in message.text
    assert "prices.json" in message.text and "/etc" not in message.text
    assert render.failure_line(None, TRACEBACK) == (
        "FileNotFoundError: train_file: train.jsonl does not exist"
    )
    url = "https://files.slack.com/files-pri/T1-F1/x.jsonl"
    assert url in render.error(f"Could not fetch {url}").text  # a URL is not a server path
    unexpected = bot.workflow.unexpected(OSError(f"cannot open {sys.prefix}/x"), "checking d1")
    assert "Traceback" not in unexpected.text and sys.prefix not in unexpected.text
