"""Which Runner (trainers.runner) trains for each provider name.

One line per backend: the name a plan uses, and where its class lives
(imported only when asked for, so the SDK behind one backend costs nothing
to a team that never uses it).
"""

from __future__ import annotations

import importlib

RUNNERS: dict[str, str] = {
    "openai": "trainers.openai_runner:OpenAIRunner",
    "local": "trainers.local:LocalRunner",
    "together": "trainers.together_ft:TogetherRunner",
    "ray": "trainers.ray_runner:RayRunner",
}


def runner_class(name: str) -> type:
    """The Runner class registered as `name`; KeyError naming those known."""
    try:
        module, _, attr = RUNNERS[name].partition(":")
    except KeyError:
        raise KeyError(f"no runner {name!r} (known: {', '.join(sorted(RUNNERS))})") from None
    return getattr(importlib.import_module(module), attr)
