"""Chatting with a local model in a worker process that keeps it loaded.

`/finetune chat` on a local run asks the base model and the run's LoRA adapter
one prompt. Loading a model takes seconds to minutes and gigabytes, so it
never happens in the bot's process: `ChatWorker` starts
``python -m trainers.chat_worker`` and speaks JSON lines with it over its
stdin and stdout, one request at a time.

The worker keeps the last model it loaded (one base model and one adapter)
for the next prompt and exits by itself after `IDLE_SECONDS` without a
request, or when its stdin closes (the bot stopped). A request for another
run's model replaces the loaded one. The worker's environment is
`trainers.local.worker_env`: no Slack or OpenAI secret reaches it.

The protocol, one JSON object per line:

    request   {"base": "<folder or hub id>", "adapter": "<adapter folder>",
               "messages": [{"role": "user", "content": "..."}],
               "max_new_tokens": 128}
    answer    {"base": "...", "tuned": "...", "pid": 123, "loaded": true, "seconds": 1.2}
    failure   {"error": "ValueError: one line", "pid": 123}

A failure leaves the worker running; a worker that dies (killed, out of
memory) is noticed by the client, which says so and starts a new one on the
next request. torch, transformers and peft are imported only inside the
worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers.errors import TrainerError

IDLE_SECONDS = 300.0  # the worker exits after this long without a request
ANSWER_TIMEOUT_S = 900.0  # loading a large model on a CPU and answering both ways
START_TIMEOUT_S = 60.0  # the process must say it is ready within this
MAX_WAITING = 3  # chats waiting for their turn; one more is told the worker is busy
MAX_NEW_TOKENS = 128
MAX_LINE_BYTES = 16 << 20  # a reply longer than this is a broken worker
IDLE_MARGIN_S = 1.0  # a worker this close to its idle exit is replaced, not raced


class ChatError(TrainerError, RuntimeError):
    """A chat could not be answered; the message is one line, worded for a person."""


class ChatBusy(ChatError):
    """Too many chats are already waiting for the worker."""


class ChatWorkerDied(ChatError):
    """The worker process ended while answering."""


@dataclass(frozen=True)
class ChatAnswer:
    base: str
    tuned: str
    pid: int  # the process that generated both answers
    loaded: bool  # the model was loaded for this request (not kept from the last one)
    seconds: float
    notice: str | None = None  # e.g. the previous worker had died and a new one started


class ChatWorker:
    """The bot's side: one worker process at a time, started when needed.

    `ask` is safe to call from many threads: callers take turns; when more
    than `max_waiting` are already waiting, `ChatBusy` is raised at once.
    """

    def __init__(
        self,
        *,
        idle_seconds: float = IDLE_SECONDS,
        answer_timeout: float = ANSWER_TIMEOUT_S,
        max_waiting: int = MAX_WAITING,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        if idle_seconds <= 0 or answer_timeout <= 0:
            raise ValueError("idle_seconds and answer_timeout must be above 0")
        if max_waiting < 0:
            raise ValueError("max_waiting must be 0 or more")
        self.idle_seconds = idle_seconds
        self.answer_timeout = answer_timeout
        self.max_waiting = max_waiting
        self.log_path = log_path
        self._env = env
        self._python = python
        self._turn = threading.Lock()  # held while a request is in flight
        self._count_lock = threading.Lock()
        self._waiting = 0  # callers holding or waiting for the turn
        self._proc: subprocess.Popen | None = None
        self._reader: _Lines | None = None
        self._last_reply = 0.0  # monotonic time of the worker's last line: its idle clock

    # -- the caller's side ---------------------------------------------------------------

    def ask(
        self,
        base_model: str,
        adapter_dir: str | Path,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ) -> ChatAnswer:
        """Both answers to `messages`: the base model's and the adapter's."""
        with self._count_lock:
            if self._waiting > self.max_waiting:
                raise ChatBusy(
                    f"the local chat model is busy ({self._waiting} chats in line); "
                    "ask again in a minute"
                )
            self._waiting += 1
        try:
            with self._turn:
                return self._ask(
                    {
                        "base": str(base_model),
                        "adapter": str(adapter_dir),
                        "messages": [dict(m) for m in messages],
                        "max_new_tokens": int(max_new_tokens),
                    }
                )
        finally:
            with self._count_lock:
                self._waiting -= 1

    @property
    def pid(self) -> int | None:
        """The worker's pid while it runs, else None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def close(self) -> None:
        """Stop the worker (it would stop by itself when idle)."""
        with self._turn:
            self._stop()

    # -- inside the turn -------------------------------------------------------------------

    def _ask(self, request: dict) -> ChatAnswer:
        notice = self._ensure_started()
        reply = self._send(request)
        if reply is None:  # it left after its idle time just as the prompt came: once more
            self._forget()
            self._start()
            reply = self._send(request)
        if not reply:
            raise self._died("while answering")
        try:
            data = json.loads(reply)
        except ValueError:
            self._stop()
            raise ChatError(
                "the chat worker answered something unreadable; it was stopped"
            ) from None
        if "error" in data:
            raise ChatError(f"the local model could not answer: {data['error']}")
        return ChatAnswer(
            base=str(data.get("base", "")),
            tuned=str(data.get("tuned", "")),
            pid=int(data.get("pid", self._proc.pid)),
            loaded=bool(data.get("loaded")),
            seconds=float(data.get("seconds") or 0.0),
            notice=notice,
        )

    def _send(self, request: dict) -> bytes | None:
        """The worker's reply line; b"" when it died, None when it had left on its own (exit 0)."""
        assert self._proc is not None and self._reader is not None
        line = (json.dumps(request) + "\n").encode()
        try:
            self._proc.stdin.write(line)  # type: ignore[union-attr]
            self._proc.stdin.flush()  # type: ignore[union-attr]
            reply = self._reader.readline(self.answer_timeout)
        except TimeoutError:
            self._stop()
            raise ChatError(
                f"the local model gave no answer within {self.answer_timeout:.0f} s; "
                "its worker was stopped, and the next chat starts a new one"
            ) from None
        except OSError:  # a broken pipe: it is gone
            reply = b""
        if reply:
            self._last_reply = time.monotonic()
            return reply
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return b""
        return None if code == 0 else b""

    def _ensure_started(self) -> str | None:
        """Start a worker unless one runs; say so when the last one had died."""
        notice = None
        proc = self._proc
        if proc is not None and proc.poll() is not None:
            if proc.returncode != 0:  # 0: it left after its idle time, as it should
                notice = (
                    f"the previous chat worker had stopped ({_exit_words(proc.returncode)}); "
                    "a new one loaded the model"
                )
            self._forget()
        elif proc is not None and (
            time.monotonic() - self._last_reply > self.idle_seconds - IDLE_MARGIN_S
        ):
            self._stop()  # about to leave on its own: a fresh one, rather than a race
        if self._proc is None:
            self._start()
        return notice

    def _start(self) -> None:
        from trainers.local import _project_root, worker_env

        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                [self._python, "-m", "trainers.chat_worker", "--idle", str(self.idle_seconds)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,  # a signal to the bot's group leaves it be, and back
                env=worker_env(os.environ if self._env is None else self._env),
                cwd=_project_root(),
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # the child holds its own copy
        self._reader = _Lines(self._proc.stdout.fileno())  # type: ignore[union-attr]
        try:
            ready = self._reader.readline(START_TIMEOUT_S)
        except TimeoutError:
            ready = b""
        try:
            started = bool(ready) and json.loads(ready).get("ready") is True
        except (ValueError, AttributeError):
            started = False
        if not started:
            self._stop()
            raise ChatError("the chat worker did not start; see chat-worker.log")
        self._last_reply = time.monotonic()

    def _died(self, when: str) -> ChatWorkerDied:
        proc = self._proc
        code = None
        if proc is not None:
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._stop()
        self._forget()
        return ChatWorkerDied(
            f"the chat worker stopped {when} ({_exit_words(code)}: killed, or out of memory); "
            "ask again: the next chat starts a new one"
        )

    def _stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self._forget()

    def _forget(self) -> None:
        proc, self._proc, self._reader = self._proc, None, None
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            if proc.poll() is None:
                threading.Thread(target=proc.wait, daemon=True).start()


def _exit_words(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class _Lines:
    """Whole lines from a file descriptor, with a timeout; no data is lost between calls."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""

    def readline(self, timeout: float | None) -> bytes:
        """One line with its newline; b"" at end of file; TimeoutError when none came in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                raise TimeoutError
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                rest, self.buffer = self.buffer, b""
                return rest if rest.endswith(b"\n") else b""  # a cut line is no answer
            self.buffer += chunk
            if len(self.buffer) > MAX_LINE_BYTES:
                raise ValueError("line too long")
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"


# ---- the worker's side ------------------------------------------------------------------------


class _Loaded:
    """One base model with one LoRA adapter, on the best device there is."""

    def __init__(self, base_model: str, adapter_dir: str) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        adapter = Path(adapter_dir)
        if not (adapter / "adapter_config.json").is_file():
            raise ValueError(f"{adapter.name} has no adapter_config.json: not a saved LoRA adapter")
        # The adapter's tokenizer when it has one: training may add tokens or a template.
        source = str(adapter) if (adapter / "tokenizer_config.json").is_file() else base_model
        tokenizer = AutoTokenizer.from_pretrained(source)
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float32
        if self.device == "cuda" and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
        base = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype)
        self.model = PeftModel.from_pretrained(base, str(adapter)).to(self.device).eval()
        self.tokenizer = tokenizer
        self.key = (base_model, adapter_dir)

    def answer(self, messages: list[dict], max_new_tokens: int) -> tuple[str, str]:
        """(base, tuned): greedy, the tuned one with the adapter on, the base one without."""
        import torch

        prompt = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        encoded = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(
            self.device
        )

        def generate() -> str:
            with torch.inference_mode():
                output = self.model.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new = output[0, encoded["input_ids"].shape[1] :]
            return self.tokenizer.decode(new, skip_special_tokens=True).strip()

        tuned = generate()
        with self.model.disable_adapter():
            base = generate()
        return base, tuned

    def close(self) -> None:
        import gc

        del self.model
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()


def _check_request(data: object) -> tuple[str, str, list[dict], int]:
    if not isinstance(data, dict):
        raise ValueError("a request must be a JSON object")
    base, adapter, messages = data.get("base"), data.get("adapter"), data.get("messages")
    if not isinstance(base, str) or not base or not isinstance(adapter, str) or not adapter:
        raise ValueError("a request needs base and adapter")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
    ):
        raise ValueError("a request needs messages: a list of {role, content}")
    tokens = data.get("max_new_tokens", MAX_NEW_TOKENS)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= 4096:
        raise ValueError("max_new_tokens must be a whole number from 1 to 4096")
    return base, adapter, messages, tokens


def serve(stdin_fd: int, reply: Any, idle_seconds: float) -> int:
    """Answer requests from `stdin_fd` on `reply` until idle or end of input."""
    lines = _Lines(stdin_fd)
    loaded: _Loaded | None = None
    _send(reply, {"ready": True, "pid": os.getpid()})
    while True:
        try:
            raw = lines.readline(idle_seconds)
        except TimeoutError:
            print(
                f"chat worker {os.getpid()}: idle for {idle_seconds:.0f} s; exiting",
                file=sys.stderr,
            )
            return 0
        if not raw:
            return 0  # the bot closed the pipe
        started = time.monotonic()
        try:
            base, adapter, messages, tokens = _check_request(json.loads(raw))
            fresh = loaded is None or loaded.key != (base, adapter)
            if fresh:
                if loaded is not None:
                    loaded.close()
                    loaded = None
                loaded = _Loaded(base, adapter)
            assert loaded is not None
            base_text, tuned_text = loaded.answer(messages, tokens)
        except Exception as exc:
            import traceback

            traceback.print_exc(file=sys.stderr)
            _send(reply, {"error": _one_line(exc), "pid": os.getpid()})
            continue
        _send(
            reply,
            {
                "base": base_text,
                "tuned": tuned_text,
                "pid": os.getpid(),
                "loaded": fresh,
                "seconds": round(time.monotonic() - started, 3),
            },
        )


def _send(reply: Any, data: dict) -> None:
    reply.write(json.dumps(data) + "\n")
    reply.flush()


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else 'no detail'}"[:500]


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trainers.chat_worker")
    parser.add_argument("--idle", type=float, default=IDLE_SECONDS, help="seconds before exiting")
    args = parser.parse_args(argv)
    # The protocol keeps the real stdout; anything a library prints goes to stderr (the log).
    reply = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # no loading bars in chat-worker.log
    try:
        code = serve(0, reply, args.idle)
    except BrokenPipeError:
        code = 0
    # Leave at once: tearing torch down at interpreter exit takes seconds, and a bot that
    # sends a prompt meanwhile would find a worker that no longer reads.
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
