"""Modals: the reason for a rejection, the advise questions, and the advice they lead to."""

from __future__ import annotations

from bot.render.actions import (
    ADVISE,
    CALLS_PER_DAY,
    GOOD_EXAMPLES,
    PROBLEMS,
    REASON,
    REJECT_REASON,
    TRIED,
)
from bot.render.text import Message, section

# slack_sdk's typed blocks are imported inside the functions: the CLI renders
# reports without them. Plain-text objects are built without `emoji`, so the JSON
# is what Slack always got.


def reject_modal(run_id: str) -> dict:
    """Asked when Reject is clicked; submitting it ends the request with the reason."""
    from slack_sdk.models.blocks import InputBlock, PlainTextInputElement, PlainTextObject
    from slack_sdk.models.views import View

    return View(
        type="modal",
        callback_id=REJECT_REASON,
        private_metadata=run_id,
        title=PlainTextObject(text=f"Reject {run_id}"),
        submit=PlainTextObject(text="Reject"),
        close=PlainTextObject(text="Cancel"),
        blocks=[
            InputBlock(
                block_id=REASON,
                label=PlainTextObject(text="Why? The requester sees this."),
                element=PlainTextInputElement(action_id=REASON, multiline=True, max_length=500),
            )
        ],
    ).to_dict()


def advise_modal(channel: str) -> dict:
    """The questions `/finetune advise` asks: what is wrong, volume, examples, what was tried."""
    from slack_sdk.models.blocks import (
        CheckboxesElement,
        InputBlock,
        NumberInputElement,
        Option,
        PlainTextObject,
    )
    from slack_sdk.models.views import View

    from trainers import advise

    def checkboxes(
        block_id: str, label: str, items: dict[str, str], optional: bool | None = None
    ) -> InputBlock:
        options = [
            Option(text=PlainTextObject(text=text[:75]), value=key) for key, text in items.items()
        ]
        return InputBlock(
            block_id=block_id,
            label=PlainTextObject(text=label),
            element=CheckboxesElement(action_id=block_id, options=options),
            optional=optional,  # None: no key, as Slack's default (required)
        )

    def number(block_id: str, label: str, hint: str) -> InputBlock:
        return InputBlock(
            block_id=block_id,
            label=PlainTextObject(text=label),
            hint=PlainTextObject(text=hint),
            element=NumberInputElement(is_decimal_allowed=False, action_id=block_id, min_value="0"),
        )

    return View(
        type="modal",
        callback_id=ADVISE,
        private_metadata=channel,
        title=PlainTextObject(text="Should we fine-tune?"),
        submit=PlainTextObject(text="Advise me"),
        blocks=[
            checkboxes(PROBLEMS, "What is wrong today?", advise.PROBLEMS),
            number(CALLS_PER_DAY, "Calls a day", "How often the model is called in production"),
            number(GOOD_EXAMPLES, "Good examples you have", "Reviewed input/output pairs"),
            checkboxes(TRIED, "What have you tried?", advise.TRIED, optional=True),
        ],
    ).to_dict()


def advice(advice, user: str | None = None) -> Message:
    lines = advice.lines()
    head = f"<@{user}> here is what I'd do:" if user else "Here is what I'd do:"
    text = head + "\n" + "\n".join(lines)
    return Message(text, [section(text)], in_channel=True)
