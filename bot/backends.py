"""Which runner trains for which provider, with which key and where.

`Backends` maps a run's provider to the Runner (trainers/runner.py) that
trains for it and to the handle of its job: ``local`` (a worker process on
this machine, or a Ray job when ``TUNEBOT_LOCAL_RUNNER=ray``,
bot/ray_runs.py), ``openai`` (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``),
``together`` (``TOGETHER_API_KEY``, ``TUNEBOT_TOGETHER_BASE_URL``) or a
providers-file name (trainers/providers.py: the runner of its kind, at its
base URL, with the key from its variable). Hosted runners are built once
each; the run lifecycle that drives them is bot/runs.py's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bot.config import Settings
from bot.context import Context
from bot.errors import UserError
from bot.priority import ACKS
from storage import Run
from trainers.runner import Handle, Runner

if TYPE_CHECKING:
    from trainers.openai_ft import OpenAIFineTuner

OWN = ("local", "distill", "eval")  # providers that are tunebot's own work, not a hosted API


class Backends:
    """The runners of one installation, built from its Context (settings, store,
    providers file). `tuner` builds the OpenAI client the ``openai`` runner uses
    (tests give one pointed at a fake); by default it is built from the settings."""

    def __init__(self, ctx: Context, *, tuner: Callable[[], OpenAIFineTuner] | None = None):
        self.ctx = ctx
        self._tuner_factory = tuner or self._default_tuner
        self._tuner: OpenAIFineTuner | None = None
        self._hosted: dict[str, Runner] = {}  # runners of hosted providers, built once each
        self._hosted_lock = threading.Lock()
        self._ray: Runner | None = None  # built once: it keeps its client to the cluster

    @property
    def settings(self) -> Settings:
        """The installation's settings, read from the Context each time (never a copy)."""
        return self.ctx.settings

    def _default_tuner(self) -> OpenAIFineTuner:
        from trainers.openai_ft import OpenAIFineTuner

        if not self.settings.openai_api_key:
            raise UserError("OPENAI_API_KEY is not set, so tunebot cannot reach OpenAI.")
        return OpenAIFineTuner.from_settings(
            self.settings.openai_api_key,
            self.settings.openai_base_url or None,
            before_request=ACKS.step_aside,
        )

    @property
    def tuner(self) -> OpenAIFineTuner:
        """OpenAI's fine-tuning client, built on first use; UserError when
        ``OPENAI_API_KEY`` is not set."""
        if self._tuner is None:
            self._tuner = self._tuner_factory()
        return self._tuner

    def runner(self, provider: str) -> Runner:
        """The Runner (trainers.runner) that trains for `provider`; the bot drives each
        the same way: claim, `find` or `submit` under the claim, `poll`, `cancel`.

        `provider` is ``local``, ``openai``, ``together`` (TOGETHER_API_KEY,
        TUNEBOT_TOGETHER_BASE_URL) or a providers-file name (trainers/providers.py:
        the runner of its kind, at its base URL, with the key from its variable).
        UserError when the provider is unknown or its key is not set."""
        if provider == "local" and self.on_ray:
            if self._ray is None:
                from bot import ray_runs

                self._ray = ray_runs.make_runner(self.settings)
            return self._ray
        if provider == "local":
            from trainers.local import LocalRunner

            return LocalRunner(
                self.settings.home / "runs",
                processes=self.settings.local_processes,
                accelerate_config=self.settings.accelerate_config or None,
            )
        if provider == "openai":
            from trainers.openai_runner import OpenAIRunner

            return OpenAIRunner(self.tuner)
        with self._hosted_lock:
            built = self._hosted.get(provider)
            if built is None:
                built = self._hosted[provider] = self._hosted_runner(provider)
            return built

    def _hosted_runner(self, provider: str) -> Runner:
        kind, api_key, base_url = self.credentials(provider)
        if kind == "together":
            from trainers.together_ft import TogetherRunner

            return TogetherRunner.from_settings(api_key, base_url, before_request=ACKS.step_aside)
        from trainers.openai_ft import OpenAIFineTuner
        from trainers.openai_runner import OpenAIRunner

        return OpenAIRunner(
            OpenAIFineTuner.from_settings(api_key, base_url, before_request=ACKS.step_aside)
        )

    def credentials(self, provider: str) -> tuple[str, str, str | None]:
        """(kind, API key, base URL or None for the provider's own) of a hosted provider
        other than ``openai``; UserError naming the variable when its key is not set."""
        if provider == "together":
            if not self.settings.together_api_key:
                raise UserError("TOGETHER_API_KEY is not set, so tunebot cannot reach Together AI.")
            return (
                "together",
                self.settings.together_api_key,
                self.settings.together_base_url or None,
            )
        configured = self.ctx.providers.get(provider)
        if configured is None:
            raise UserError(f"runs on {provider} are not offered by this bot")
        key = configured.api_key()
        if not key:
            raise UserError(
                f"{configured.api_key_env} is not set, so tunebot cannot reach {provider}."
            )
        return configured.kind, key, configured.base_url

    def reachable(self, provider: str) -> bool:
        """A hosted provider's key is set (so its jobs can be looked up)."""
        if provider == "openai":
            return bool(self.settings.openai_api_key)
        try:
            self.credentials(provider)
        except UserError:
            return False
        return True

    def kind(self, provider: str) -> str:
        """The runner a provider's runs go through: ``local``, ``openai`` (OpenAI's API, at
        OpenAI or another host) or ``together``; a provider tunebot does its own work
        for (distill, eval) is itself."""
        if provider in ("together", "openai", *OWN):
            return provider
        configured = self.ctx.providers.get(provider)
        if configured is not None and configured.kind == "together":
            return "together"
        return "openai"

    @property
    def on_ray(self) -> bool:
        """Local runs train as Ray jobs (TUNEBOT_LOCAL_RUNNER=ray; bot/ray_runs.py)."""
        return self.settings.local_runner == "ray"

    def key(self, run_id: str) -> str:
        """The idempotency key for run `run_id`'s external work: unique to this installation."""
        return f"{self.ctx.store.installation_id}:{run_id}"

    def run_dir(self, run_id: str) -> Path:
        """Where a local run's worker writes: ``TUNEBOT_HOME/runs/<run id>``."""
        return self.settings.home / "runs" / run_id

    def handle(self, run: Run) -> Handle:
        """The handle of a run's job, from what the run recorded."""
        if run.provider == "local" and self.on_ray:
            from bot import ray_runs

            return ray_runs.handle(self.runner("local"), self.key(run.id), run.external_id or "")
        where = str(self.run_dir(run.id)) if run.provider == "local" else None
        return Handle(self.kind(run.provider), run.external_id or "", where=where)
