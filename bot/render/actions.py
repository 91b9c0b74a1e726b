"""The ids Slack sends back: button action ids, modal callback ids, input block ids.

Defined once, here: the views put them in the blocks, the listeners match on them.
"""

from __future__ import annotations

# Buttons on the approval card (bot.render.runs); the value is the run id.
APPROVE_RUN = "approve_run"
REJECT_RUN = "reject_run"
OVERRIDE_SECRET = "override_secret"
CARD_ACTIONS = (APPROVE_RUN, REJECT_RUN, OVERRIDE_SECRET)

# The reject-reason modal (bot.render.modals); private_metadata is the run id.
REJECT_REASON = "reject_reason"
REASON = "reason"  # its one input: block id and action id

# The advise modal (bot.render.modals); private_metadata is the channel.
ADVISE = "advise"
# Its inputs, each a block whose one element has the same action id.
PROBLEMS = "problems"
CALLS_PER_DAY = "calls_per_day"
GOOD_EXAMPLES = "good_examples"
TRIED = "tried"
