"""`/finetune eval rN local` and `/finetune chat rN local "…"`: a Together run, answered here.

A Together run's tuned model serves on Together only while Together serves
it. Once its LoRA adapter is downloaded (`/finetune download rN`,
bot/weights.py), these two commands load that adapter on the run's base model
on this machine (bot/downloaded.py checks the folder and finds the base in
TUNEBOT_MODEL_DIRS; ``base=`` names another), so a team keeps using and
measuring the model at $0 hosted cost:

- ``eval rN local [base=…] [eval=<dataset>]``: base vs base + adapter on the
  run's recorded held-out split (or ``eval=``'s dataset), through
  ``trainers.evaluate.generate_local`` on a long job; the usual evaluation
  message, stored and posted in the run's thread, says it ran locally. No
  spend reservation and no approval: nothing paid runs (the LLM judge and any
  teacher are left out, offline scorers only). One such evaluation per run at
  a time.
- ``chat rN local "<prompt>" [base=…]``: the local chat worker
  (``trainers.chat_worker``, the same one local runs use) answers with the
  base and with the adapter, side by side.

Neither calls Together. Who may: anyone in the run's channel, as for a local
run's evaluation and chat (nothing is spent). For a local run ``local`` adds
nothing (it already runs here) and the usual command answers.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from bot import render
from bot.commands import Command
from bot.downloaded import LocalCopy, local_copy
from bot.errors import Busy, UserError, describe
from bot.evaluation import EvalCost

if TYPE_CHECKING:
    from bot.context import Context
    from bot.runs import Runs
    from storage import Run

log = logging.getLogger("tunebot")

WORD = "local"  # the word after the run that asks for this


class Offline:
    def __init__(self, ctx: Context, runs: Runs) -> None:
        self.ctx = ctx
        self.runs = runs
        self.store = ctx.store
        self._busy: set[str] = set()  # runs with a local evaluation going
        self._lock = threading.Lock()

    # --- which command ------------------------------------------------------------------

    @staticmethod
    def asked(cmd: Command) -> bool:
        """True when `cmd` (eval or chat) has ``local`` after the run.

        Raises UserError for ``base=`` without ``local``, and for eval's words
        other than ``local`` (chat's next word is its prompt)."""
        local = len(cmd.args) > 1 and cmd.args[1].lower() == WORD
        if not local and "base" in cmd.options:
            raise UserError(
                f"`base=` goes with `local`: `/finetune {cmd.name} {cmd.target or 'r1'} local "
                "base=…` runs a downloaded adapter here on that base."
            )
        if not local and cmd.name == "eval" and len(cmd.args) > 1:
            raise UserError(
                f"`{render.escape(cmd.args[1])}` is not understood after the run: say `local` "
                f"to evaluate a downloaded adapter here (`/finetune eval {cmd.target} local`)."
            )
        if not local and cmd.name == "chat" and len(cmd.args) > 2:
            raise UserError(
                'Put the prompt in double quotes: `/finetune chat r1 "How do I reset my password?"`.'
            )
        return local

    def _copy(self, cmd: Command, channel: str) -> tuple[Run, LocalCopy | None]:
        """The run, and its local copy (None: a local run, which needs none)."""
        run = self.runs.find_run(cmd.target, channel)
        if run.provider == "local":
            if "base" in cmd.options:
                raise UserError(
                    f"{run.id} is a local run: it answers on the model it trained on, so "
                    "`base=` is not taken."
                )
            return run, None
        if run.provider in ("distill", "eval"):
            raise UserError(f"{run.id} is not a training run, so it has no adapter.")
        kind = self.runs.backends.kind(run.provider)
        if kind != "together":
            raise UserError(
                f"{run.id} trained on {render.provider_name(run.provider)}, whose weights "
                "cannot be downloaded; `local` runs a Together run's downloaded adapter here."
            )
        if run.status != "succeeded" or not run.external_id:
            raise UserError(f"{run.id} is {run.status}: only a succeeded run has an adapter.")
        return run, local_copy(self.runs.settings, self.store, run, cmd.options.get("base"))

    # --- eval ---------------------------------------------------------------------------

    def evaluate(self, cmd: Command, channel: str, user: str) -> render.Message:
        """`/finetune eval rN local`: checks in the ack, the evaluation on a long job."""
        from trainers.evaluate import examples_from_file

        run, copy = self._copy(cmd, channel)
        evals = self.runs.evals
        if copy is None:
            return evals.request(run.id, channel, cmd.options.get("eval"), user)
        eval_sha, eval_dataset_id = evals.held_out(run, channel, cmd.options.get("eval"))
        examples = examples_from_file(self.ctx.blobs.path(eval_sha))
        if not examples:
            raise UserError(
                f"The evaluation set of {run.id} has no example with an assistant turn."
            )
        with self._lock:
            if run.id in self._busy:
                return render.note(
                    f"{run.id} is being evaluated from its downloaded adapter; its thread gets "
                    "the results."
                )
            self._busy.add(run.id)
        free = EvalCost(len(examples), 0.0, 0.0, None, 0.0, 0.0)  # nothing paid: no judge
        try:
            self.ctx.submit(
                f"evaluating {run.id} locally",
                lambda: self._evaluate(run.id, eval_sha, eval_dataset_id, free, copy),
                run.channel,
                run.thread_ts,
                long=True,
                on_busy=lambda: self._done(run.id),
            )
        except Busy as exc:
            raise UserError(
                f"tunebot is busy ({exc.ahead} jobs ahead); ask again in a minute."
            ) from None
        self.store.audit(
            user, "eval_local_requested", run_id=run.id, detail={"base": copy.base_name}
        )
        return render.note(
            f"Evaluating {run.id} here from its downloaded adapter on `{copy.base_name}` "
            "(no call to Together, $0 hosted); the results go to its thread."
        )

    def _done(self, run_id: str) -> None:
        with self._lock:
            self._busy.discard(run_id)

    def _evaluate(
        self, run_id: str, eval_sha: str, eval_dataset_id: str | None, cost, copy: LocalCopy
    ) -> None:
        try:
            self.runs.evals.evaluate(run_id, eval_sha, eval_dataset_id, cost=cost, local=copy)
        except (ValueError, RuntimeError, OSError) as exc:  # the adapter does not fit the base
            log.error("run %s: local evaluation failed: %s", run_id, exc)
            raise UserError(
                f"{run_id} could not be evaluated from its downloaded adapter on "
                f"`{copy.base_name}`: " + self._words(exc)
            ) from None
        finally:
            self._done(run_id)

    def _words(self, exc: BaseException) -> str:
        return render.escape(render.short_paths(describe(exc, self.runs.settings.home)))[:300]

    # --- chat ---------------------------------------------------------------------------

    def chat(self, cmd: Command, channel: str, user: str) -> render.Message:
        """`/finetune chat rN local "<prompt>"`: the local chat worker answers, both ways."""
        run, copy = self._copy(cmd, channel)
        rest = Command(cmd.name, (cmd.args[0], *cmd.args[2:]), cmd.options)
        if copy is None:
            return self.runs.distiller.chat(rest, channel, user)
        prompt = cmd.options.get("prompt") or " ".join(cmd.args[2:])
        if not prompt.strip():
            raise UserError(
                f'Give a prompt: `/finetune chat {run.id} local "How do I reset my password?"`'
            )
        try:
            self.ctx.submit(
                f"asking {run.id}'s downloaded adapter",
                lambda: self._answer(run, copy, prompt),
                channel,
                run.thread_ts,
                long=True,
            )
        except Busy as exc:
            raise UserError(
                f"tunebot is busy ({exc.ahead} jobs ahead); ask again in a minute."
            ) from None
        return render.note(
            f"Asking {run.id}'s base and downloaded adapter here (no call to Together); "
            "the answers go to its thread."
        )

    def _answer(self, run: Run, copy: LocalCopy, prompt: str) -> None:
        from trainers.chat_worker import ChatError

        try:  # the worker process: one chat at a time, the model kept loaded a while
            answer = self.runs.distiller.chat_worker.ask(
                str(copy.base), copy.adapter, [{"role": "user", "content": prompt}]
            )
        except ChatError as exc:
            raise UserError(
                f"{run.id}'s local models did not answer: {self._words(exc)}."
            ) from None
        if answer.notice:
            self.ctx.post(run.channel, run.thread_ts, render.note(f"Note: {answer.notice}."))
        self.ctx.post(
            run.channel,
            run.thread_ts,
            render.side_by_side(
                run, prompt, answer.base, answer.tuned, base_name=copy.base_name, local=copy.label
            ),
        )
