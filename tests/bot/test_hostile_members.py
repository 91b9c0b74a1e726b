"""A hostile (and a careless) channel member against the real bot over signed HTTP.

Each test states the right behaviour. Those with a "Found by attack" comment
name a defect an attack review found, since fixed; the rest are kept for the
coverage they add.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.bot.test_distill import prompts_file
from tests.bot.test_paid_guarantees import succeeded_run, wait_for
from tests.bot.test_runs import click, request, submit_reason, texts, upload
from tests.conftest import SECRET_KEY, chat_jsonl, secret_training_file, training_file
from tests.fakes.signing import file_share_message_event

KEY = SECRET_KEY
VICTIM = "U0VICTIM"


def everything(bot) -> list[str]:
    """Every message the bot posted or answered with, text and blocks, as Slack would parse it."""
    out = [m["text"] + json.dumps(m.get("blocks") or [], ensure_ascii=False)
           for m in bot.slack.messages()]  # fmt: skip
    out += [e.get("text", "") + json.dumps(e.get("blocks") or "") for e in bot.slack.ephemerals]
    return out


def pings(text: str) -> list[str]:
    """Mentions Slack would notify: `<!channel>`, `<!here>`, `<!everyone>`, `<@U…>`."""
    return re.findall(r"<!(?:channel|here|everyone)[^>]*>|<@U[A-Z0-9]+(?:\|[^>]*)?>", text)


def server_paths(bot, text: str) -> list[str]:
    home = str(bot.settings.home)
    found = [home] if home in text else []
    return found + re.findall(r"/(?:tmp|home|srv|root|usr|var)/[\w.+@/-]+", text)


# --- no server path in the thread -------------------------------------------------------


# Found by attack (now fixed): a run whose held-out split cannot be made (10-14 examples, or too few distinct
# ones) succeeds and then posts "r1: not evaluated (no evaluation set: /…/home/blobs/…
# has 12 example(s); …)": the blob's server path, in a note (render.note never strips
# paths; trainers.evaluate.split_file puts `{path}` in its ValueError; bot/evaluation.py
# Evaluations.prepare stores it as data["note"] and after_success posts it).
def test_a_run_too_small_to_split_says_so_without_a_server_path(paid_bot):
    bot = paid_bot(judge_model="")
    assert succeeded_run(bot, training_file(12)).status == "succeeded"
    notes = [t for t in texts(bot) if "not evaluated" in t]
    assert len(notes) == 1, texts(bot)
    assert not server_paths(bot, notes[0]), notes[0]
    assert "blobs" not in notes[0]


# --- forget means forget: this dataset's, and nothing else's ------------------------------


def _clean(n: int, topic: str) -> bytes:
    return chat_jsonl(
        n,
        f"Tell me about {topic} number {{i}}, please.",
        f"Here is a thorough answer about {topic} {{i}}.",
    )


# Found by attack (now fixed): forgetting d1 deletes blobs that other datasets still use. _forget_files in
# bot/admin.py deletes d1's findings and token-counts blobs when no *dataset* has the
# same sha256 as those blobs (Store.sha_in_use compares dataset bytes only), but the
# findings blob of every clean file is the same "[]" (and equal token counts give equal
# count blobs). After `forget d1` by its uploader, `validate d2` / `train d2` on a
# different, untouched dataset fail with "Something went wrong".
def test_forgetting_one_dataset_leaves_every_other_dataset_usable(paid_bot):
    bot = paid_bot(judge_model="")
    upload(bot, _clean(20, "parcels"), name="a.jsonl")  # d1, by U1
    upload(bot, _clean(20, "refunds"), name="b.jsonl")  # d2, by U1: other bytes, no findings
    assert bot.store.get_dataset("d1").sha256 != bot.store.get_dataset("d2").sha256
    _, body = bot.command("forget d1", user_id="U1")
    assert "d1 is forgotten" in body["text"]
    bot.wait_idle()
    _, body = bot.command("validate d2", user_id="U2")
    assert "Posting d2's report" in body["text"], body["text"]
    body = request(bot, "train d2", user="U2")
    assert "r1 needs approval" in body["text"], body["text"]


# Found by attack (now fixed): README: "`train`, `eval` and `distill` on it then answer 'd3 was forgotten on … by
# @x'". `eval r1` for a run on a forgotten dataset reads the deleted held-out split blob
# and answers "Something went wrong while answering /finetune 'eval r1'" instead
# (bot/evaluation.py Evaluations.request / _ask never look at the dataset's forgotten_at).
def test_eval_of_a_run_whose_dataset_was_forgotten_says_so(paid_bot):
    bot = paid_bot(judge_model="")
    succeeded_run(bot)
    _, body = bot.command("forget d1", user_id="U1")
    assert "d1 is forgotten" in body["text"]
    bot.wait_idle()
    _, body = bot.command("eval r1", user_id="UR")
    assert "d1 was forgotten" in body["text"], body["text"]
    assert "Something went wrong" not in body["text"]


# --- nobody is pinged by someone else's words ---------------------------------------------


# Found by attack (now fixed): render._inert keeps every `<@U…>` as "the bot's own mention", including one inside
# user text. ingest() puts the raw file name in the size refusal (bot/workflow.py,
# `f"{name} is … MiB"`), so a file named "<@U0VICTIM>.jsonl" over the limit pings
# U0VICTIM in the channel. Escape the name (render.escape) where the message is built.
def test_a_file_name_in_a_refusal_pings_nobody(bot):
    file = bot.slack.add_file(training_file(12), name=f"<@{VICTIM}> <!channel> big.jsonl")
    file["size"] = 10 * 2**40  # Slack says it is 10 TiB: refused before download
    assert bot.event(file_share_message_event(file), event_id="EvBig") == 200
    bot.wait_idle()
    (reply,) = bot.slack.messages(channel="C1")
    assert "was not downloaded" in reply["text"] or "limit" in reply["text"]
    assert not pings(reply["text"] + json.dumps(reply["blocks"])), reply["text"]


# Found by attack (now fixed): the rejection note is built as render.note(f"… rejected by <@{user}>: {reason}"),
# and note() keeps any `<@U…>` in the reason (render._inert): a reason typed as
# "<@U0VICTIM> …" pings that person in the channel (bot/runs.py Runs.decide). Escape the
# reason before composing the note (the card already does: escape(reasons[0])).
def test_a_reject_reason_cannot_ping_a_user(paid_bot):
    bot = paid_bot()
    upload(bot)
    request(bot)
    click(bot, "UB", "reject_run")
    assert submit_reason(bot, "UB", f"ask <@{VICTIM}> and <#C9>") == 200
    bot.wait_idle()
    assert bot.store.get_run("r1").status == "rejected"
    (note,) = [m for m in bot.slack.messages(channel="C1") if "was rejected by" in m["text"]]
    assert pings(note["text"]) == ["<@UR>", "<@UB>"], note["text"]
    assert f"&lt;@{VICTIM}&gt;" in note["text"]


# --- secrets never reach a hosted model unreleased ----------------------------------------


# Found by attack (now fixed): `system="…"` of /finetune distill is sent to the hosted teacher with every prompt,
# but it is never scanned for secrets: `chat` prompts go through egress.check_prompt, the
# distillation's system prompt does not (bot/distillation.py Distiller.request / plan;
# the plan's secret_hold looks only at the prompts file's findings). One approval later
# the key is in every teacher call. Call egress.check_prompt(system) in request().
def test_a_distill_system_prompt_with_a_secret_is_never_sent(paid_bot):
    bot = paid_bot()
    upload(bot, prompts_file(12), name="prompts.jsonl")
    body = request(bot, f'distill teacher=gpt-4.1 system="Use the key {KEY} for lookups."')
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    sent = [c.body.decode("utf-8", "replace") for c in bot.openai.chat_calls()]
    assert not any(KEY in s for s in sent), (body["text"], len(sent))
    assert not any(KEY in t for t in everything(bot))


# --- options: odd numbers and odd words are usage errors at request time ------------------


@pytest.mark.parametrize(
    "text, field",
    [
        ("train provider=openai epochs=1e309", "epochs"),
        ("train provider=openai epochs=26", "epochs"),
        ("train provider=openai lr_mult=nan", "lr_mult"),
        ("train provider=openai split=0.5", "split"),
        ("train provider=openai split=-0.1", "split"),
        ("train provider=openai suffix=*bold*", "suffix"),
        ("train provider=openai suffix=<!channel>", "suffix"),
        ("train provider=openai suffix=" + "x" * 41, "suffix"),
        ("train provider=local r=0", "r"),
        ("train provider=local qlora=maybe", "qlora"),
        ("train provider=local model=../../etc", "model"),
        ("train provider=local model=~/models/x", "model"),
        ("train provider=local model=/etc", "model"),
        ("train provider=openai model=../../etc/passwd", "passwd"),
    ],
)
def test_odd_options_are_usage_errors_and_nothing_is_asked(paid_bot, text, field):
    bot = paid_bot(local_needs_approval=True)
    upload(bot)
    _, body = bot.command(text, user_id="UR")
    assert body["response_type"] == "ephemeral" and body["text"].startswith("⚠️"), body
    assert field in body["text"]
    assert not pings(body["text"]) and "<!channel>" not in json.dumps(body)
    assert bot.store.find_run("r1") is None


# Found by attack (now fixed): no upper bound on whole-number hyper-parameters. `r=99999999999` (and alpha=,
# max_length=, batch= for either provider) is accepted by bot/plans.py `positive` and
# frozen into a plan that approvers sign, to fail (or exhaust the GPU's memory) only at
# launch / OpenAI's create (batch_size is 1..256 there, and in tests/fakes). README: hyper-parameters "are
# checked when the run is requested". Give `positive` a maximum per field.
@pytest.mark.parametrize(
    "text, field",
    [
        ("train provider=local r=99999999999", "r"),
        ("train provider=local alpha=99999999999", "alpha"),
        ("train provider=local max_length=99999999999", "max_length"),
        ("train provider=local batch=99999999999", "batch"),
        ("train provider=openai batch=99999999999", "batch"),  # OpenAI: 1..256
    ],
)
def test_huge_hyper_parameters_are_usage_errors(paid_bot, text, field):
    bot = paid_bot(local_needs_approval=True)
    upload(bot)
    _, body = bot.command(text, user_id="UR")
    bot.wait_idle()
    assert body["text"].startswith("⚠️") and f"{field}=" in body["text"], body["text"]
    assert bot.store.find_run("r1") is None


# Found by attack (now fixed): bot/plans.py checks suffix= with str.isalnum(), which is true for any Unicode letter
# or digit ("ünïcode", "数据", "²"), so such a suffix is approved and then refused by
# OpenAI at job creation (the usage error itself says "letters, digits, - and _").
# Use an ASCII pattern: re.fullmatch(r"[A-Za-z0-9_-]{1,40}", suffix).
@pytest.mark.parametrize("suffix", ["ünïcode", "数据", "x²"])
def test_a_non_ascii_suffix_is_a_usage_error(paid_bot, suffix):
    bot = paid_bot()
    upload(bot)
    _, body = bot.command(f"train provider=openai suffix={suffix}", user_id="UR")
    bot.wait_idle()
    assert "suffix=" in body["text"] and body["text"].startswith("⚠️"), body["text"]
    assert bot.store.find_run("r1") is None


def test_a_split_just_under_half_still_trains_on_more_than_it_holds_out(paid_bot):
    bot = paid_bot()
    upload(bot)
    body = request(bot, "train provider=openai split=0.4999999")
    assert "r1 needs approval" in body["text"]
    split = bot.store.get_run("r1").result_json["data"]["split"]
    assert split["eval"] <= split["train"] and split["eval"] + split["train"] == 40


# --- chat: any prompt, shown inert ----------------------------------------------------------


def test_a_chat_prompt_with_mentions_and_links_is_shown_inert_and_clipped(paid_bot):
    bot = paid_bot(judge_model="")
    succeeded_run(bot)
    bot.openai.chat_script = lambda req: f"<!here> see <https://evil.example|docs> <@{VICTIM}>"
    prompt = f"<!channel> <@{VICTIM}> <https://evil.example|click> " + "why? " * 700
    _, body = bot.command(f'chat r1 "{prompt}"', user_id="UR")
    assert "Asking the base and the tuned model of r1" in body["text"], body["text"]
    bot.wait_idle()
    (reply,) = [m for m in bot.slack.messages(channel="C1") if m["text"].startswith("r1 — prompt:")]
    shown = reply["text"] + json.dumps(reply["blocks"])
    assert not pings(shown) and "<https://" not in shown, reply["text"][:400]
    assert len(reply["text"]) < 3_500  # the 3,500-character prompt is clipped


# Found by attack (now fixed): a quoted prompt that contains "=" is parsed as an option: `chat r1 "what does
# a=b mean?"` answers "`chat` has no option `what does a`" (bot/commands.py parse()
# partitions every word on "=", even a quoted one with spaces). Only a bare `key=value`
# word should be an option; `prompt="…"` works but nobody guesses it.
def test_a_quoted_chat_prompt_may_contain_an_equals_sign(paid_bot):
    bot = paid_bot(judge_model="")
    succeeded_run(bot)
    _, body = bot.command('chat r1 "what does x=1 mean in the config?"', user_id="UR")
    bot.wait_idle()
    assert "Asking the base and the tuned model of r1" in body["text"], body["text"]


# --- who may do what ------------------------------------------------------------------------


# Found by attack (policy gap, now fixed): an approver can release the possible secrets in a file they uploaded
# themselves (bot/admin.py Admin.release checks only is_approver). On a card *Send despite
# secrets* is "never on their own request"; by name, one person alone can upload a file
# with credentials and release it to hosted models (the LLM judge, eval, chat). Refuse a
# release by the dataset's uploader, like a self-approval.
def test_an_approver_cannot_release_secrets_they_uploaded(paid_bot):
    bot = paid_bot(judge_model="")
    file = bot.slack.add_file(secret_training_file(12), name="leaky.jsonl", user="UA")
    bot.event(file_share_message_event(file), event_id="EvLeaky")
    bot.wait_idle()
    assert bot.store.get_dataset("d1").user == "UA"
    _, body = bot.command("release d1", user_id="UA")
    assert "released d1" not in body["text"], body["text"]
    assert not [e for e in bot.store.audit_log(dataset_id="d1") if e.action == "release_secrets"]
    _, body = bot.command("release d1", user_id="UB")  # another approver may
    assert "<@UB> released d1" in body["text"]


def test_strangers_cannot_cancel_forget_or_override_and_requesters_cannot_approve(paid_bot):
    bot = paid_bot()
    file = bot.slack.add_file(secret_training_file(40), name="leaky.jsonl", user="U1")
    bot.event(file_share_message_event(file), event_id="EvLeaky40")
    bot.wait_idle()
    request(bot, "train provider=openai", user="UR")
    assert bot.store.get_run("r1").plan_json["secret_hold"] is True
    _, body = bot.command("cancel r1", user_id="UX")
    assert "Only <@UR> or an approver can cancel r1" in body["text"]
    _, body = bot.command("forget d1", user_id="UX")
    assert "Only <@U1> or an approver can forget d1" in body["text"]
    _, body = bot.command("release d1", user_id="UR")
    assert "Only an approver can release d1" in body["text"]
    for user, action in (("UR", "approve_run"), ("UR", "override_secret"), ("UX", "approve_run"),
                         ("UX", "override_secret"), ("UA", "approve_run")):  # fmt: skip
        assert click(bot, user, action) == 200
    bot.wait_idle()
    run = bot.store.get_run("r1")
    assert run.status == "pending_approval"  # UA approved, but nobody allowed overrode
    assert {(a.user, a.decision) for a in bot.store.approvals("r1")} == {("UA", "approve")}
    assert not bot.openai.calls_to("POST", "/files")
    refused = {(e.actor, e.action) for e in bot.store.audit_log(run_id="r1")}
    assert {("UR", "refused_approve"), ("UR", "refused_override_secret"),
            ("UX", "refused_approve"), ("UX", "refused_override_secret")} <= refused  # fmt: skip
    assert bot.store.get_dataset("d1").forgotten_at is None


# --- the worker's environment ---------------------------------------------------------------


# Found by attack (low, now fixed): trainers/local.py worker_env drops a prefixed variable only when one of its
# "_"-separated parts is exactly TOKEN, SECRET, KEY, …; plurals and run-together words
# under an allowed prefix (TORCH_HUB_TOKENS, DS_SECRETKEY, NCCL_PASSWORDS,
# CUDA_API_KEYS, ACCELERATE_HUBTOKEN) reach the worker. Match the words as substrings.
def test_the_worker_gets_no_secret_looking_variable_under_an_allowed_prefix():
    from trainers.local import worker_env

    leaky = {
        "TORCH_HUB_TOKENS": "t", "DS_SECRETKEY": "s", "NCCL_PASSWORDS": "p",
        "CUDA_API_KEYS": "k", "ACCELERATE_HUBTOKEN": "h",
    }  # fmt: skip
    kept = worker_env({**leaky, "PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0"})
    assert kept == {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0"}, kept


# --- careless file names ----------------------------------------------------------------------


def test_path_like_and_multiline_file_names_are_data_not_paths_or_markup(bot):
    names = ["../../etc/passwd.jsonl", f"a\n`x` *b* <@{VICTIM}> <!here>\n.jsonl"]
    for i, name in enumerate(names):
        file = bot.slack.add_file(training_file(12), name=name)
        assert bot.event(file_share_message_event(file), event_id=f"EvName{i}") == 200
    bot.wait_idle()
    reports = [m for m in bot.slack.messages(channel="C1") if "12 examples" in m["text"]]
    assert len(reports) == 2
    assert any(r["text"].startswith("../../etc/passwd.jsonl (d") for r in reports)  # either order
    for m in reports:
        assert not pings(m["text"] + json.dumps(m["blocks"])), m["text"]
    home = bot.settings.home
    assert not (home.parent / "etc").exists() and not (home / ".." / ".." / "etc").exists()
    _, listing = bot.command("datasets")
    assert not [p for p in pings(listing["text"]) if p != "<@U1>"], listing["text"]


# --- one channel never reaches another's things -----------------------------------------------


def test_another_channel_cannot_name_this_channels_datasets_or_runs(paid_bot):
    bot = paid_bot(channels=("C1", "C2"))
    upload(bot)  # d1 in C1
    request(bot, "train provider=openai", user="UR")  # r1 in C1
    for text in ("train d1", "validate d1", "estimate d1", "forget d1", "release d1",
                 "distill d1 teacher=gpt-4.1", "train eval=d1", "status r1", "cancel r1",
                 "audit r1", "eval r1", 'chat r1 "hi"', "train provider=local model=r1"):  # fmt: skip
        _, body = bot.command(text, user_id="UA", channel_id="C2")
        assert body["response_type"] == "ephemeral", (text, body)
        assert re.search(r"No (dataset|run) `?[dr]1|no run r1 in this channel|No dataset in this",
                         body["text"]), (text, body["text"])  # fmt: skip
    _, body = bot.command("datasets", channel_id="C2")
    assert "d1" not in body["text"]
    _, body = bot.command("runs", channel_id="C2")
    assert "r1" not in body["text"]
    _, body = bot.command("budget", channel_id="C2")
    assert "r1" not in body["text"] and "<@UR>" not in body["text"]
    _, body = bot.command("help", channel_id="C3")
    assert "does not serve this channel" in body["text"]
    bot.wait_idle()
    assert bot.store.get_run("r1").status == "pending_approval"
    assert bot.store.get_dataset("d1").forgotten_at is None


# Found by attack (low, same root cause as the two ping bugs above, now fixed): render._inert treats any
# `<@U…>` in a composed message as the bot's own mention, so words a member typed come
# back as live mentions: `/finetune status <@U0VICTIM>` answers "No run `<@U0VICTIM>`…"
# (bot/runs.py find_run / bot/workflow.py _status put the raw ref in the UserError).
# Ephemeral here, so nobody is notified, but the same path pings in thread posts.
# Fix at the root: escape user words where they enter a message (render.escape), and
# let _inert keep only mentions the bot composed (or drop _inert's exception).
def test_a_mention_typed_as_a_run_name_comes_back_inert(bot):
    for text in (f"status <@{VICTIM}>", f"cancel <@{VICTIM}>", f"validate <@{VICTIM}>"):
        _, body = bot.command(text)
        assert body["text"].startswith("⚠️") and not pings(body["text"]), (text, body["text"])


# --- empty and useless files: a clear answer, nothing started -------------------------------


def test_an_empty_file_cannot_be_trained_or_distilled_and_says_why(paid_bot):
    bot = paid_bot()
    file = bot.slack.add_file(b"", name="empty.jsonl")  # (upload() swaps b"" for a good file)
    bot.event(file_share_message_event(file), event_id="EvEmpty")
    bot.wait_idle()
    thread_ts = file["shares"]["public"]["C1"][0]["ts"]
    (report,) = bot.slack.messages(channel="C1", thread_ts=thread_ts)
    assert report["text"].startswith("empty.jsonl (d1): 0 examples")
    _, body = bot.command("train provider=openai", user_id="UR")
    assert "d1 has 1 error(s) and cannot be trained" in body["text"], body["text"]
    _, body = bot.command("train provider=local", user_id="UR")
    assert "cannot be trained" in body["text"]
    _, body = bot.command("estimate", user_id="UR")
    assert "Posting the estimate for d1" in body["text"]
    request(bot, "distill teacher=gpt-4.1", user="UR")
    bot.wait_idle()
    said = [m["text"] for m in bot.slack.messages(channel="C1", thread_ts=thread_ts)]
    assert any("d1 has no prompts the teacher can answer" in t for t in said), said
    assert all("Something went wrong" not in t for t in said)
    assert bot.store.runs(limit=None) == [] and not bot.openai.chat_calls()


# --- distillation prompts with secrets ----------------------------------------------------


def _leaky_prompts(form: str, n: int = 12) -> bytes:
    if form == "prompt":
        rows = [{"prompt": f"My key is {KEY}, why does call {i} fail?"} for i in range(n)]
    else:
        rows = [
            {"messages": [{"role": "user", "content": f"My key is {KEY}, why does call {i} fail?"}]}
            for i in range(n)
        ]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


# Found by attack (now fixed): a prompts file in the documented `{"prompt": "…"}` form is never scanned for
# secrets: trainers.data.validate stops at `missing_messages` for such a line, so its
# report has no `possible_secret`, bot/distillation.py Distiller.plan sets secret_hold
# False, and one ordinary Approve sends every key to the hosted teacher. Scan every
# string of a line for secrets whatever its shape (or have Distiller.plan scan the
# loaded prompts with trainers.secrets.find_secrets and hold the run).
def test_prompt_lines_with_secrets_are_held_before_the_teacher_sees_them(paid_bot):
    bot = paid_bot()
    upload(bot, _leaky_prompts("prompt"), name="prompts.jsonl")
    request(bot, "distill teacher=gpt-4.1", user="UR")
    run = bot.store.get_run("r1")
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    sent = [c.body.decode("utf-8", "replace") for c in bot.openai.chat_calls()]
    assert not any(KEY in s for s in sent), (run.plan_json["secret_hold"], len(sent))
    assert bot.store.get_run("r1").status == "pending_approval"


def test_messages_prompts_with_secrets_are_held_until_overridden(paid_bot):
    bot = paid_bot()
    upload(bot, _leaky_prompts("messages"), name="prompts.jsonl")
    request(bot, "distill teacher=gpt-4.1", user="UR")
    assert bot.store.get_run("r1").plan_json["secret_hold"] is True
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    assert bot.store.get_run("r1").status == "pending_approval" and not bot.openai.chat_calls()


# Found by attack (race, now fixed): `distill` right after a drop, while the file is still being checked, freezes
# secret_hold from a dataset that has no report yet (bot/distillation.py Distiller.plan:
# `"possible_secret" in (dataset.report_json or {})…` is False when report_json is None),
# so a file whose report will say possible_secret is distilled after one Approve. `train`
# refuses such a dataset ("has no report yet", Workflow.stored_report); distill should too
# (in request(), and again in price_work).
def test_distill_of_a_file_still_being_checked_is_refused_or_held(paid_bot):
    bot = paid_bot()
    bot.workflow.ctx.validation_pool.submit(time.sleep, 4).done()  # the checker is busy a while
    file = bot.slack.add_file(_leaky_prompts("messages"), name="prompts.jsonl")
    assert bot.event(file_share_message_event(file), event_id="EvRace") == 200
    dataset = wait_for(lambda: bot.store.latest_dataset("C1"), 10, "the dataset to be recorded")
    assert dataset.report_json is None  # recorded, not checked yet
    _, body = bot.command("distill teacher=gpt-4.1", user_id="UR")
    bot.wait_idle()
    assert bot.store.get_dataset("d1").report_json["codes"]["possible_secret"] == 12
    run = bot.store.find_run("r1")
    if run is not None:
        click(bot, "UA", "approve_run")
        bot.wait_idle()
    sent = [c.body.decode("utf-8", "replace") for c in bot.openai.chat_calls()]
    assert not any(KEY in s for s in sent), (body["text"], run and run.plan_json["secret_hold"])


# Found by attack (race, same root, now fixed): `eval r1 eval=d2` while d2 is still being checked sends d2's
# examples to OpenAI: bot/evaluation.py Evaluations.request accepts a dataset with no
# report (`(dataset.errors or 0) > 0` is False for None) and egress.held counts its
# secrets from report_json, which is None. Refuse an eval set (and a train eval=) that
# has no report yet, as `train` does for its own dataset.
def test_eval_on_a_set_still_being_checked_sends_nothing(paid_bot):
    bot = paid_bot(judge_model="")
    succeeded_run(bot)
    before = len(bot.openai.chat_calls())
    bot.workflow.ctx.validation_pool.submit(time.sleep, 4).done()
    file = bot.slack.add_file(secret_training_file(12), name="leaky-eval.jsonl")
    assert bot.event(file_share_message_event(file), event_id="EvRaceEval") == 200
    dataset = wait_for(lambda: bot.store.find_dataset("d2"), 10, "d2 to be recorded")
    assert dataset.report_json is None  # recorded, not checked yet
    _, body = bot.command("eval r1 eval=d2", user_id="UR")
    bot.wait_idle()
    assert bot.store.get_dataset("d2").report_json["codes"]["possible_secret"] == 12
    sent = [c.body.decode("utf-8", "replace") for c in bot.openai.chat_calls()[before:]]
    assert not any(KEY in s for s in sent), (body["text"], len(sent))


# Found by attack (same family as the findings blob, now fixed): the held-out split is content-addressed, so the
# same file in two channels gets the same train/eval split blobs; `forget d1` in C1
# deletes them (bot/admin.py _forget_files only spares shas that some *dataset* has), and
# C2's run r2, on its own dataset d2, then fails at submission for a missing blob.
# Reference-count blobs across datasets *and* runs (and report blobs) before deleting.
def test_forgetting_a_file_in_one_channel_leaves_the_same_file_in_another_usable(paid_bot):
    bot = paid_bot(judge_model="", channels=("C1", "C2"))
    for channel, user in (("C1", "U1"), ("C2", "U2")):
        file = bot.slack.add_file(training_file(40), name="same.jsonl", channel=channel, user=user)
        assert bot.event(file_share_message_event(file), event_id=f"EvSame{channel}") == 200
        bot.wait_idle()
    request(bot, "train d1 provider=openai", user="UR")  # r1 in C1
    _, body = bot.command("train d2 provider=openai", user_id="UR", channel_id="C2")
    bot.wait_idle()
    assert "r2 needs approval" in body["text"]
    _, body = bot.command("forget d1", user_id="U1")
    assert "d1 is forgotten; r1 cancelled" in body["text"]
    bot.wait_idle()
    assert click(bot, "UA", "approve_run", run_id="r2", channel="C2") == 200
    bot.wait_idle()
    run = bot.store.get_run("r2")
    assert run.status in ("submitting", "running"), (run.status, run.error)


# Found by attack (low, now fixed): render.short_paths cuts a server path at its first space, so when
# TUNEBOT_HOME (or any folder above it) has a space the rest of the path reaches Slack:
# "BlobNotFound: no blob … in /srv/team home/blobs" is posted as "… in team home/blobs".
# Match path parts up to the next path-like boundary (or replace the known roots:
# TUNEBOT_HOME, sys.prefix, the project folder) before posting.
def test_a_failure_under_a_home_with_a_space_shows_no_part_of_the_path(paid_bot, tmp_path):
    bot = paid_bot(judge_model="", home=tmp_path / "team home")
    upload(bot)
    request(bot, "train provider=openai", user="UR")
    data = bot.store.get_run("r1").result_json["data"]
    bot.workflow.blobs.path(data["train_sha256"]).unlink()  # the disk lost the split
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    run = bot.store.get_run("r1")
    assert run.status == "failed"
    (said,) = [t for t in texts(bot) if "r1 ❌ failed" in t]
    assert "home/blobs" not in said and "team home" not in said, said
