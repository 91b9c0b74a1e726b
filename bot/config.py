"""Settings: the one place that reads the environment.

`Settings.from_env(mapping)` takes an explicit mapping (os.environ in
production, a dict in tests) and returns a frozen dataclass. Every field has a
default; lists are comma-separated; money is USD; an unset budget means no cap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from bot.errors import BotError

DEFAULT_SLACK_API_URL = "https://slack.com/api/"


class ConfigError(BotError, ValueError):
    """A setting has a value tunebot cannot use; the message names the variable."""


def _meta(env: str, help: str) -> dict:
    return {"env": env, "help": help}


@dataclass(frozen=True)
class Settings:
    slack_bot_token: str = field(default="", metadata=_meta("SLACK_BOT_TOKEN", "Bot token, xoxb-…"))
    slack_app_token: str = field(
        default="", metadata=_meta("SLACK_APP_TOKEN", "App-level token, xapp-… (Socket Mode)")
    )
    slack_signing_secret: str = field(
        default="", metadata=_meta("SLACK_SIGNING_SECRET", "Signing secret (HTTP mode)")
    )
    slack_api_url: str = field(
        default=DEFAULT_SLACK_API_URL,
        metadata=_meta("SLACK_API_URL", "Slack Web API base URL"),
    )
    slack_file_hosts: tuple[str, ...] = field(
        default=("files.slack.com",),
        metadata=_meta(
            "TUNEBOT_SLACK_FILE_HOSTS",
            "Hosts (host or host:port) files are downloaded from with the bot token, over https "
            "only; plain http is allowed for a loopback host named here (a local fake)",
        ),
    )
    openai_api_key: str = field(default="", metadata=_meta("OPENAI_API_KEY", "OpenAI API key"))
    openai_base_url: str = field(
        default="", metadata=_meta("OPENAI_BASE_URL", "OpenAI API base URL (default: OpenAI's)")
    )
    together_api_key: str = field(
        default="", metadata=_meta("TOGETHER_API_KEY", "Together AI API key (provider=together)")
    )
    together_base_url: str = field(
        default="",
        metadata=_meta(
            "TUNEBOT_TOGETHER_BASE_URL", "Together AI API base URL (default: Together's)"
        ),
    )
    home: Path = field(
        default=Path("~/.tunebot").expanduser(),
        metadata=_meta("TUNEBOT_HOME", "Folder for the database, datasets and artifacts"),
    )
    max_file_mb: int = field(
        default=512,
        metadata=_meta("TUNEBOT_MAX_FILE_MB", "Largest training file accepted, in MiB"),
    )
    file_wait_seconds: float = field(
        default=30.0,
        metadata=_meta(
            "TUNEBOT_FILE_WAIT_SECONDS",
            "How long a shared file Slack cannot serve yet (not found, no link, no share) is "
            "retried before the thread is told",
        ),
    )
    reshared_files: str = field(
        default="report",
        metadata=_meta(
            "TUNEBOT_RESHARED_FILES",
            "A file already checked in another channel: `report` (a full report here too) or "
            "`pointer` (one line with its counts; the check is not run again)",
        ),
    )
    channels: tuple[str, ...] = field(
        default=(),
        metadata=_meta("TUNEBOT_CHANNELS", "Channel ids the bot serves; empty: every channel"),
    )
    prices_file: Path | None = field(
        default=None,
        metadata=_meta("TUNEBOT_PRICES", "JSON file overriding the training price table"),
    )
    providers_file: Path | None = field(
        default=None,
        metadata=_meta(
            "TUNEBOT_PROVIDERS", "TOML file naming more hosted providers (trainers/providers.py)"
        ),
    )
    default_model: str = field(
        default="gpt-4o-mini-2024-07-18",
        metadata=_meta("TUNEBOT_DEFAULT_MODEL", "Model estimated and trained when none is named"),
    )

    default_provider: str = field(
        default="local",
        metadata=_meta(
            "TUNEBOT_DEFAULT_PROVIDER", "Provider when /finetune train names none: local or openai"
        ),
    )
    approvers: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "TUNEBOT_APPROVERS", "Slack user ids and user-group ids who may approve paid runs"
        ),
    )
    required_approvals: int = field(
        default=1, metadata=_meta("TUNEBOT_REQUIRED_APPROVALS", "Approvals a paid run needs")
    )
    two_approvals_above_usd: float | None = field(
        default=None,
        metadata=_meta(
            "TUNEBOT_TWO_APPROVALS_ABOVE_USD", "Estimates above this need at least 2 approvals"
        ),
    )
    max_run_usd: float | None = field(
        default=None,
        metadata=_meta("TUNEBOT_MAX_RUN_USD", "Largest estimate one run may have; unset: no cap"),
    )
    monthly_budget_usd: float | None = field(
        default=None,
        metadata=_meta(
            "TUNEBOT_MONTHLY_BUDGET_USD", "Spend allowed per calendar month (UTC); unset: no cap"
        ),
    )
    approval_ttl_hours: float = field(
        default=24.0, metadata=_meta("TUNEBOT_APPROVAL_TTL_HOURS", "Hours before a request expires")
    )
    eval_approval_above_usd: float = field(
        default=1.0,
        metadata=_meta(
            "TUNEBOT_EVAL_APPROVAL_ABOVE_USD",
            "Evaluations estimated above this need an approval like a run; a chat above it "
            "is refused",
        ),
    )
    claim_lease_seconds: float = field(
        default=60.0,
        metadata=_meta(
            "TUNEBOT_CLAIM_LEASE_SECONDS",
            "Seconds a claim on a submission lasts unless renewed (a dead bot's lapses then)",
        ),
    )
    job_threads: int = field(
        default=4,
        metadata=_meta(
            "TUNEBOT_JOB_THREADS",
            "Threads for long jobs (file checks, evaluations, distillations, chats, submissions)",
        ),
    )
    job_queue: int = field(
        default=20,
        metadata=_meta(
            "TUNEBOT_JOB_QUEUE",
            "Long jobs that may wait for a thread; past this a request is answered busy",
        ),
    )
    distill_max_tokens: int = field(
        default=1024,
        metadata=_meta(
            "TUNEBOT_DISTILL_MAX_TOKENS",
            "Most tokens a teacher may write per answer; the estimate counts every prompt at this",
        ),
    )
    local_needs_approval: bool = field(
        default=False,
        metadata=_meta("TUNEBOT_LOCAL_NEEDS_APPROVAL", "Whether local runs need approval too"),
    )
    poll_seconds: float = field(
        default=30.0,
        metadata=_meta("TUNEBOT_POLL_SECONDS", "Seconds between polls of running jobs"),
    )
    progress_seconds: float = field(
        default=10.0,
        metadata=_meta(
            "TUNEBOT_PROGRESS_SECONDS", "Least seconds between edits of a progress message"
        ),
    )

    eval_concurrency: int = field(
        default=8,
        metadata=_meta(
            "TUNEBOT_EVAL_CONCURRENCY", "Model calls in flight at once during an evaluation"
        ),
    )
    judge_model: str = field(
        default="gpt-4.1-mini-2025-04-14",
        metadata=_meta("TUNEBOT_JUDGE_MODEL", "LLM judge for evaluations (needs OPENAI_API_KEY)"),
    )
    local_base_model: str = field(
        default="smollm2",
        metadata=_meta(
            "TUNEBOT_LOCAL_BASE_MODEL",
            "Model for provider=local when none is named: a name, hub id or folder (inside "
            "TUNEBOT_MODEL_DIRS)",
        ),
    )
    model_dirs: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "TUNEBOT_MODEL_DIRS",
            "Folders whose model folders local runs may train on (model=/full/path); "
            "empty: none, only names, hub ids and this channel's runs",
        ),
    )
    chat_idle_seconds: float = field(
        default=300.0,
        metadata=_meta(
            "TUNEBOT_CHAT_IDLE_SECONDS",
            "Seconds the local chat worker keeps a model loaded after the last chat",
        ),
    )
    local_slots: int = field(
        default=1,
        metadata=_meta("TUNEBOT_LOCAL_SLOTS", "Local training runs at once; the rest queue"),
    )
    local_processes: int = field(
        default=1,
        metadata=_meta(
            "TUNEBOT_LOCAL_PROCESSES",
            "Processes per local run; above 1 runs under accelerate launch",
        ),
    )
    accelerate_config: str = field(
        default="",
        metadata=_meta(
            "TUNEBOT_ACCELERATE_CONFIG",
            "accelerate config file for local runs (DDP, FSDP, DeepSpeed)",
        ),
    )
    local_runner: str = field(
        default="subprocess",
        metadata=_meta(
            "TUNEBOT_LOCAL_RUNNER",
            "Where provider=local trains: subprocess (a worker on this machine) or ray "
            "(a job on the Ray cluster at TUNEBOT_RAY_ADDRESS)",
        ),
    )
    ray_address: str = field(
        default="http://127.0.0.1:8265",
        metadata=_meta("TUNEBOT_RAY_ADDRESS", "The Ray cluster's dashboard (its Jobs API)"),
    )
    artifacts: str = field(
        default="",
        metadata=_meta(
            "TUNEBOT_ARTIFACTS",
            "Where Ray runs keep their data, checkpoints, progress and adapter: a folder or "
            "file:/// URI every node sees, or s3://bucket/prefix (the [s3] extra; keys and "
            "endpoint from the AWS_* variables); empty: TUNEBOT_HOME/artifacts",
        ),
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is None or raw.strip() == "":
                continue
            values[f.name] = _parse(f.name, f.metadata["env"], raw.strip())
        return cls(**values)  # type: ignore[arg-type]

    @property
    def max_file_bytes(self) -> int:
        return self.max_file_mb * 1024 * 1024

    def serves(self, channel: str | None) -> bool:
        return not self.channels or channel in self.channels

    @classmethod
    def documented(cls) -> list[tuple[str, str, str]]:
        """(variable, default, help) for every setting: the README's table."""
        rows = []
        for f in fields(cls):
            default = f.default
            shown = "" if default in ("", (), None) else str(default)
            rows.append((f.metadata["env"], shown, f.metadata["help"]))
        return rows


_LISTS = {"channels", "approvers", "slack_file_hosts", "model_dirs"}
_INTS = {
    "max_file_mb": 1, "required_approvals": 1, "local_slots": 1, "local_processes": 1,
    "eval_concurrency": 1, "distill_max_tokens": 1, "job_threads": 1, "job_queue": 0,
}  # fmt: skip
_FLOATS = {
    "approval_ttl_hours", "poll_seconds", "progress_seconds", "claim_lease_seconds",
    "chat_idle_seconds", "file_wait_seconds",
}  # fmt: skip
_ZERO_OK = {"progress_seconds", "file_wait_seconds"}  # 0: every poll; no waiting for files
_MONEY = {"two_approvals_above_usd", "max_run_usd", "monthly_budget_usd", "eval_approval_above_usd"}
_BOOLS = {"local_needs_approval"}
_CHOICES = {
    "default_provider": ("local", "openai"),
    "reshared_files": ("report", "pointer"),
    "local_runner": ("subprocess", "ray"),
}


def _parse(name: str, env: str, raw: str) -> object:
    if name in ("home", "prices_file", "providers_file"):
        return Path(raw).expanduser()
    if name in _LISTS:
        return tuple(c.strip() for c in raw.split(",") if c.strip())
    if name in _INTS:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{env} must be a whole number, not {raw!r}") from None
        if value < _INTS[name]:
            raise ConfigError(f"{env} must be at least {_INTS[name]}, not {value}")
        return value
    if name in _FLOATS or name in _MONEY:
        try:
            value = float(raw.removeprefix("$").replace(",", ""))
        except ValueError:
            raise ConfigError(f"{env} must be a number, not {raw!r}") from None
        if value < 0 or (name in _FLOATS - _ZERO_OK and value == 0) or value != value:
            raise ConfigError(f"{env} must be a positive number, not {raw!r}")
        return value
    if name in _BOOLS:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{env} must be true or false, not {raw!r}")
    if name in _CHOICES:
        if raw.lower() not in _CHOICES[name]:
            raise ConfigError(f"{env} must be one of {', '.join(_CHOICES[name])}, not {raw!r}")
        return raw.lower()
    if name == "artifacts":
        from urllib.parse import urlparse

        from trainers.artifacts import resolve

        scheme = urlparse(raw).scheme
        if scheme not in ("", "file", "s3"):
            raise ConfigError(
                f"{env}: {scheme}:// is not supported; give a folder or file:/// URI that "
                "every node of the Ray cluster sees (a shared mount), or an s3://bucket/prefix"
            )
        if not scheme and not raw.startswith("/"):  # ~ and relative: another folder per machine
            raise ConfigError(
                f"{env} must be an absolute folder (or a file:/// URI) that every node of the "
                f"Ray cluster sees, not {raw!r}"
            )
        try:
            resolve(raw)
        except ValueError as exc:
            raise ConfigError(f"{env}: {exc}".replace("artifacts: ", "")) from None
        return raw
    if name == "ray_address":
        from urllib.parse import urlsplit

        parts = urlsplit(raw if "://" in raw else f"http://{raw}")
        if parts.username or parts.password or parts.query or parts.fragment:
            # The address shows in queue messages and errors: it must carry no secret.
            raise ConfigError(
                f"{env} must be the dashboard's address alone (http://host:8265), without a "
                "user, password, query or fragment; put credentials in the cluster's proxy "
                "or network rules instead"
            )
        return raw
    if name == "slack_api_url" and not raw.endswith("/"):
        return raw + "/"
    return raw
