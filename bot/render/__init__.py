"""Every message tunebot shows: pure functions returning `Message(text, blocks)`.

The text alone must read well: it is what notifications, screen readers and
the CLI show. Blocks are Slack's Block Kit rendering of the same content.

One module per surface, imported one way (a module imports only those listed
before it; text and actions import none of them):

    text         Message, escape, error, note, help text, shared wording
    actions      the action, callback and block ids Slack sends back
    reports      validation reports, estimates, conversions
    lists        datasets, runs, budget, audit log
    runs         approval card, progress, queue position, results, status
    evaluations  base vs tuned, side by side
    home         the App Home tab (imports runs: the state words)
    modals       reject reason, advise, and the advice

Callers use `render.X`; the names below are the whole public surface.
"""

from __future__ import annotations

from bot.render.evaluations import eval_summary, side_by_side
from bot.render.home import home_view
from bot.render.lists import (
    audit_log,
    budget_report,
    datasets_list,
    providers_list,
    runs_list,
)
from bot.render.modals import advice, advise_modal, reject_modal
from bot.render.reports import (
    CONVERT_FORMATS,
    MAX_CODES_SHOWN,
    MAX_LINES_SHOWN,
    conversion_offer,
    conversion_summary,
    cost_lines,
    estimate_summary,
    finding_groups,
    local_line,
    reshared_pointer,
    tokens_line,
    validation_report,
    with_caveat,
)
from bot.render.runs import (
    PROVIDER_NAMES,
    answered_again,
    approval_card,
    cancelled_before_start,
    distilled,
    dt_text,
    local_accepted,
    local_progress,
    local_result,
    log_name,
    progress,
    provider_name,
    queued,
    ray_unavailable,
    retirement_notice,
    run_result,
    run_status,
    unanswered,
)
from bot.render.text import (
    SECTION_LIMIT,
    Message,
    error,
    escape,
    failure_line,
    help_text,
    money,
    note,
    short_paths,
)

__all__ = [
    "CONVERT_FORMATS",
    "MAX_CODES_SHOWN",
    "MAX_LINES_SHOWN",
    "PROVIDER_NAMES",
    "SECTION_LIMIT",
    "Message",
    "advice",
    "advise_modal",
    "answered_again",
    "approval_card",
    "audit_log",
    "budget_report",
    "cancelled_before_start",
    "conversion_offer",
    "conversion_summary",
    "cost_lines",
    "datasets_list",
    "distilled",
    "dt_text",
    "error",
    "escape",
    "estimate_summary",
    "eval_summary",
    "failure_line",
    "finding_groups",
    "help_text",
    "home_view",
    "local_accepted",
    "local_line",
    "local_progress",
    "local_result",
    "log_name",
    "money",
    "note",
    "progress",
    "provider_name",
    "providers_list",
    "queued",
    "ray_unavailable",
    "reject_modal",
    "reshared_pointer",
    "retirement_notice",
    "run_result",
    "run_status",
    "runs_list",
    "short_paths",
    "side_by_side",
    "tokens_line",
    "unanswered",
    "validation_report",
    "with_caveat",
]
