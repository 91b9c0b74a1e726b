"""Approve and Reject clicks: recorded before the ack, counted on a job thread.

`decide_later` writes the click to pending_work (so a stop between the ack
and the count loses nothing) and starts the job; `decide_work` counts it
through `Runs.decide` (bot/runs.py), which moves the run once the quorum is
reached. A refused click is answered to the clicker alone.
"""

from __future__ import annotations

from bot.context import Context
from bot.runs import Runs


class Decisions:
    """The approval flow's clicks, on `ctx`'s pending work and `runs`' decisions."""

    def __init__(self, ctx: Context, runs: Runs) -> None:
        self.ctx = ctx
        self.runs = runs

    def decide_later(
        self, run_id: str, user: str, decision: str, channel: str, reason: str | None = None
    ) -> bool:
        """A click: recorded (pending_work) before Slack hears 200, counted on a job thread.
        False when the same click (run, user, decision) is already recorded."""
        run = self.ctx.store.find_run(run_id)
        return self.ctx.start_work(
            "decide",
            f"decide:{run_id}:{user}:{decision}",
            {"run_id": run_id, "user": user, "decision": decision, "reason": reason,
             "channel": channel},
            what=f"recording {user}'s {decision} of {run_id}",
            channel=channel or (run.channel if run else "") or "",
            thread_ts=run.thread_ts if run else None,
            long=False,
        )  # fmt: skip

    def decide_work(self, args: dict) -> None:
        """The job of a recorded click (`args` as `decide_later` recorded them)."""
        refusal = self.runs.decide(
            args["run_id"], args["user"], args["decision"], reason=args.get("reason")
        )
        if refusal and args.get("channel"):  # a refused click is answered to the clicker alone
            self.ctx.client.chat_postEphemeral(
                channel=args["channel"], user=args["user"], text=f"⚠️ Not counted: {refusal}."
            )
