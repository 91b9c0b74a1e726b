"""The composition root: the services built once, wired, and the /finetune table.

`Workflow(settings, store, blobs, client)` builds the shared services
(`Context`, bot/context.py) and the use-cases on them: datasets
(bot/datasets.py), runs with their evaluations and distillations
(bot/runs.py), App Home (bot/home.py), the admin commands (bot/admin.py),
the approval clicks (bot/decisions.py) and a downloaded adapter's local
evaluation and chat (bot/offline.py). It registers what each kind of
acked work runs and the success hooks, and answers a parsed /finetune from
one dispatch table (`_commands`). Listeners and bot/serve.py reach the
services through the attributes below, each the service's own method or
object, so a listener is at most two calls from the work.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from slack_sdk import WebClient

from bot import render
from bot.admin import Admin
from bot.commands import Command
from bot.config import Settings
from bot.context import Context
from bot.datasets import Datasets
from bot.decisions import Decisions
from bot.errors import UserError
from bot.home import Home
from bot.offline import Offline
from bot.runs import Runs
from storage import BlobStore, Store


class Workflow:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        blobs: BlobStore,
        client: WebClient,
        *,
        jobs: Executor | None = None,
        validation_pool: Executor | None = None,
        tuner: Callable[[], Any] | None = None,
    ) -> None:
        ctx = self.ctx = Context(
            settings, store, blobs, client, jobs=jobs, validation_pool=validation_pool
        )
        self.datasets = Datasets(ctx)
        self.runs = Runs(ctx, self.datasets, tuner=tuner)
        self.home_tab = Home(ctx, self.runs)
        self.runs.refresh_home = self.home_tab.refresh_home  # a run changed: its people's tabs
        self.admin = Admin(ctx, self.datasets, self.runs)  # release, forget, budget, audit
        self.decisions = Decisions(ctx, self.runs)  # Approve / Reject clicks
        self.offline = Offline(ctx, self.runs)  # eval / chat of a downloaded adapter, here
        self.runs.on_success.append(self.runs.evals.after_success)  # evaluate what succeeded
        self.runs.on_success.append(self.runs.migrations.after_success)  # old vs new model
        # What each kind of acked work runs (Context.start_work); args from pending_work.
        ctx.on_work("ingest", self.datasets.ingest_work)
        ctx.on_work("decide", self.decisions.decide_work)
        ctx.on_work("price", self.runs.distiller.price_work)
        ctx.on_work("request", self.runs.request_work)

        # What listeners, bot/serve.py and the tests reach: the services' own.
        self.settings = ctx.settings
        self.store = ctx.store
        self.blobs = ctx.blobs
        self.client = ctx.client
        self.prices = ctx.prices
        self.submit = ctx.submit
        self.post = ctx.post
        self.unexpected = ctx.unexpected
        self.first_delivery = ctx.first_delivery
        self.drain = ctx.drain
        self.close = ctx.close
        self.resume = ctx.resume
        self.file_dropped = self.datasets.file_dropped
        self.decide_later = self.decisions.decide_later
        self.refresh_home = self.home_tab.refresh_home

        self.runs.approvers.warm()  # so that no ack waits on Slack for them

    # --- /finetune ---------------------------------------------------------------

    def command(self, cmd: Command, channel: str, user: str) -> render.Message:
        """Answer a parsed /finetune within the ack; slow parts go to a job.

        Returns the ack's message. `Message.in_channel` marks answers everyone
        needs; the rest are ephemeral.
        """
        if not self.settings.serves(channel):
            return render.error("tunebot does not serve this channel (see TUNEBOT_CHANNELS).")
        handler = self._commands().get(cmd.name)
        if handler is None:
            return render.help_text(unknown=cmd.name)
        return handler(cmd, channel, user)

    def _commands(self) -> dict[str, Callable[[Command, str, str], render.Message]]:
        """Each subcommand of the grammar (bot.commands.SPECS) and what answers it;
        tests hold the two to the same names."""
        runs, admin, datasets, offline = self.runs, self.admin, self.datasets, self.offline
        return {
            "help": lambda cmd, channel, user: render.help_text(unknown=cmd.target),
            "datasets": lambda cmd, channel, user: render.datasets_list(
                self.store.datasets(channel=channel, limit=15)
            ),
            "runs": lambda cmd, channel, user: render.runs_list(
                self.store.runs(channel=channel, limit=15)
            ),
            "status": lambda cmd, channel, user: self._status(cmd, channel),
            "train": runs.request,
            "distill": runs.request,
            "chat": lambda cmd, channel, user: (
                offline.chat if offline.asked(cmd) else runs.distiller.chat
            )(cmd, channel, user),
            "cancel": runs.cancel,
            "migrate": runs.migrations.request,
            "download": runs.downloads.request,
            "eval": lambda cmd, channel, user: (
                offline.evaluate(cmd, channel, user)
                if offline.asked(cmd)
                else runs.evals.request(cmd.target, channel, cmd.options.get("eval"), user)
            ),
            "budget": lambda cmd, channel, user: admin.budget(channel),
            "providers": lambda cmd, channel, user: render.providers_list(self.ctx.providers),
            "resume": runs.local.resume,
            "audit": lambda cmd, channel, user: admin.audit(cmd, channel),
            "release": admin.release,
            "forget": admin.forget,
            "convert": datasets.convert,
            "validate": datasets.validate_command,
            "estimate": datasets.estimate_command,
        }

    def _status(self, cmd: Command, channel: str) -> render.Message:
        """`/finetune status [r3]`: one run's state (the channel's latest when no id)."""
        if cmd.target:
            run = self.store.find_run(cmd.target.lower())
            if run is None or run.channel != channel:
                raise UserError(
                    f"No run `{render.escape(cmd.target)}` in this channel. `/finetune runs` lists them."
                )
        else:
            runs = self.store.runs(channel=channel, limit=1)
            if not runs:
                raise UserError("No runs in this channel yet.")
            run = runs[0]
        return render.run_status(run)
