"""Which model a local run may train on: the rules for `model=`.

A member names the model of a local run in one of four ways, and nothing else:

- a name from `tunebot models` (`trainers.models.KNOWN`), fetched into
  ``TUNEBOT_HOME/models`` at launch;
- a hub id: ``owner/name`` or a bare ``name`` by the hub's rules (letters,
  digits, ``-``, ``_``, ``.``; at most one slash; no ``..`` or ``--``; not
  starting or ending with ``-`` or ``.``; 96 characters a part), and not the
  name of a folder next to the bot (transformers would read that folder);
- a folder by its full path inside one of ``TUNEBOT_MODEL_DIRS``, checked
  after symlinks and ``..`` are resolved (so a link pointing out is refused);
- ``rN``: a succeeded local run of the same channel. Its merged model when it
  was trained with ``merge=true``; otherwise the model it was trained on with
  its adapter merged in, once, at launch, into the new run's ``base/`` folder
  (``trainers.merge``, in a process of its own).

Anything else (``~/x``, ``/etc``, a relative path, a folder outside the
dirs, another channel's run) is a `ModelRefused` usage error that lists what
is allowed. `check` runs when the run is requested and `for_launch` again
when it launches: the folder must still be inside the allowed dirs then, and
the worker gets the resolved path, not the words typed.
``TUNEBOT_LOCAL_BASE_MODEL`` goes through the same check (a name, hub id or
folder; never ``rN``): settings are trusted, but a bad one is a clear error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bot.errors import UserError
from bot.render.text import escape
from bot.results import RunResult

if TYPE_CHECKING:
    from bot.config import Settings
    from storage import Run, Store

RUN_REF = re.compile(r"^r\d+$", re.IGNORECASE)
_HUB_PART = re.compile(r"^[A-Za-z0-9_.-]{1,96}$")
MERGED_BASE = "base"  # the folder of a new run holding an unmerged rN's base + adapter


class ModelRefused(UserError):
    """`model=` names something a local run may not use."""


@dataclass(frozen=True)
class LocalModel:
    ref: str  # as written: the plan's `model`
    kind: str  # known, hub, folder, run
    path: Path | None = None  # folder: the resolved folder; run: its merged folder
    base: str | None = None  # run without a merged model: what it was trained on
    adapter: Path | None = None  # run without a merged model: its adapter
    params_billions: float | None = None  # known from the source run, for the estimate


def is_hub_id(text: str) -> bool:
    """The hub's repository id rules: ``name`` or ``owner/name``."""
    parts = text.split("/")
    if len(parts) > 2 or ".." in text or "--" in text:
        return False
    return all(
        _HUB_PART.match(part) and not part.startswith(("-", ".")) and not part.endswith(("-", "."))
        for part in parts
    )


def inside(path: Path, roots: list[Path]) -> Path | None:
    """`path` with symlinks and ``..`` resolved, when that is one of `roots` or below one."""
    try:
        resolved = path.resolve(strict=False)
    except (OSError, RuntimeError):  # a symlink loop
        return None
    for root in roots:
        if resolved == root or root in resolved.parents:
            return resolved
    return None


class LocalModels:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store

    # -- where things may be ------------------------------------------------------------

    def model_dirs(self) -> list[Path]:
        """TUNEBOT_MODEL_DIRS, resolved (a setting may use ~ and symlinks; a member may not)."""
        roots = []
        for raw in self.settings.model_dirs:
            try:
                roots.append(Path(raw).expanduser().resolve(strict=False))
            except (OSError, RuntimeError):
                continue
        return roots

    def runs_dir(self) -> Path:
        return self.settings.home / "runs"

    def cache_dir(self) -> Path:
        return self.settings.home / "models"

    def allowed(self) -> str:
        """What `model=` takes, in one paragraph, for a usage error."""
        from trainers.models import KNOWN

        dirs = self.model_dirs()
        if dirs:
            where = ", ".join(f"…/{d.name}" if d.name else "/" for d in dirs)
            folders = (
                f"a model folder by its full path inside TUNEBOT_MODEL_DIRS ({where}; "
                "ask whoever runs tunebot for the full paths)"
            )
        else:
            folders = "a model folder by its full path inside TUNEBOT_MODEL_DIRS (none is set here)"
        names = ", ".join(f"`{n}`" for n in sorted(KNOWN))
        return (
            f"`model=` takes: a name from `tunebot models` ({names}); a hub id like "
            f"`owner/name`; {folders}; or `rN`, a succeeded local run of this channel "
            "(its merged model, else its base with its adapter)."
        )

    # -- the check -------------------------------------------------------------------------

    def check(self, ref: str | None, channel: str) -> LocalModel:
        """What `model=` (or, when None, TUNEBOT_LOCAL_BASE_MODEL) names; `ModelRefused` if not allowed."""
        from_setting = ref is None
        raw = (self.settings.local_base_model if from_setting else ref).strip()
        try:
            return self._check(raw, channel, from_setting)
        except _Why as why:
            if from_setting:
                raise ModelRefused(
                    f"TUNEBOT_LOCAL_BASE_MODEL is `{escape(raw)}`, which a local run cannot use: "
                    f"{why}.",
                    "Ask whoever runs tunebot to fix the setting, or name the model: "
                    + self.allowed(),
                ) from None
            # What a member typed goes back to Slack inert: `<@U…>` or `<!channel>` pings nobody.
            raise ModelRefused(
                f"`model={escape(raw)}` is not allowed: {why}.", self.allowed()
            ) from None

    def _check(self, raw: str, channel: str, from_setting: bool) -> LocalModel:
        from trainers.models import KNOWN

        if not raw:
            raise _Why("it is empty")
        if raw in KNOWN:
            return LocalModel(raw, "known")
        if RUN_REF.match(raw):
            if from_setting:
                raise _Why("a run can be named in `model=`, not in the setting")
            return self._run(raw.lower(), channel)
        if raw.startswith("~"):
            raise _Why("`~` paths are not allowed; give a full path inside TUNEBOT_MODEL_DIRS")
        if raw.startswith("/"):
            return LocalModel(raw, "folder", path=self._folder(raw))
        if raw.startswith(".") or "\\" in raw:
            raise _Why("relative paths are not allowed; give a full path inside TUNEBOT_MODEL_DIRS")
        if not is_hub_id(raw):
            raise _Why(
                "it is neither a known name, a hub id (letters, digits, `-`, `_`, `.`, at most "
                "one slash, no `..`), a full path nor a run"
            )
        self._not_a_folder_here(raw)
        return LocalModel(raw, "hub")

    def _folder(self, raw: str) -> Path:
        roots = self.model_dirs()
        if not roots:
            raise _Why("no folder is allowed: TUNEBOT_MODEL_DIRS is not set")
        resolved = inside(Path(raw), roots)
        if resolved is None:
            raise _Why("it is outside TUNEBOT_MODEL_DIRS (after resolving links and `..`)")
        if not resolved.is_dir():
            raise _Why("there is no such folder")
        return resolved

    @staticmethod
    def _not_a_folder_here(raw: str) -> None:
        """A hub id that is also a folder beside the bot or the worker would load that folder."""
        from trainers.local import _project_root

        for base in (Path.cwd(), Path(_project_root())):
            if (base / raw).exists():
                raise _Why("that name is a folder on this server, not a hub id")

    def _run(self, run_id: str, channel: str) -> LocalModel:
        run = self.store.find_run(run_id)
        if run is None or run.channel != channel:
            raise _Why(f"there is no run {run_id} in this channel")
        if run.provider != "local" or run.status != "succeeded":
            raise _Why(f"{run_id} is not a succeeded local run")
        run_dir = self.runs_dir() / run.id
        result = RunResult.of(run)
        params = ((run.plan_json or {}).get("estimate") or {}).get("params_billions")
        merged = result.merged_dir
        if merged:
            path = inside(Path(merged), [run_dir.resolve()])
            if path is None or not path.is_dir():
                raise _Why(f"{run_id}'s merged model is gone")
            return LocalModel(run_id, "run", path=path, params_billions=params)
        adapter = result.adapter_dir
        path = inside(Path(adapter), [run_dir.resolve()]) if adapter else None
        if path is None or not (path / "adapter_config.json").is_file():
            raise _Why(f"{run_id}'s adapter is gone")
        base = self.trained_base(run)
        if base.startswith("/"):
            roots = [*self.model_dirs(), self.cache_dir().resolve(), self.runs_dir().resolve()]
            resolved = inside(Path(base), roots)
            if resolved is None or not resolved.is_dir():
                raise _Why(f"the model {run_id} was trained on is gone or no longer allowed")
            base = str(resolved)
        elif not is_hub_id(base):
            raise _Why(f"the model {run_id} was trained on is not allowed")
        return LocalModel(run_id, "run", base=base, adapter=path, params_billions=params)

    # -- at launch -----------------------------------------------------------------------

    def for_launch(self, ref: str, channel: str, run_dir: Path) -> str:
        """Checked again, then what the worker loads: a resolved folder or a hub id."""
        from trainers import models

        source = self.check(ref, channel)
        if source.kind == "known":
            return models.resolve(source.ref, self.cache_dir())
        if source.kind == "hub":
            return source.ref
        if source.path is not None:
            return str(source.path)
        from trainers.merge import merged

        assert source.base is not None and source.adapter is not None
        return str(merged(source.base, source.adapter, run_dir / MERGED_BASE))

    def trained_base(self, run: Run) -> str:
        """The model a local run's worker trained on (its spec), for chat and evaluation."""
        from trainers import local, models

        try:
            spec = json.loads((self.runs_dir() / run.id / local.SPEC).read_text())
            if isinstance(spec.get("model"), str) and spec["model"]:
                return spec["model"]
        except (OSError, ValueError, AttributeError):
            pass
        return models.resolve(run.model, self.cache_dir())  # a run from before specs were kept


class _Why(Exception):
    """Why a model is refused: the middle of the usage error."""
