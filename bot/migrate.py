"""/finetune migrate: a finished run trained again on another provider, then compared.

`/finetune migrate r3 provider=local [model=…]` re-plans run r3 through the
same Planner and request path as `/finetune train` (the same checks, the
same approval for paid providers), from the same dataset and the same
held-out split: the new plan records ``migrated_from`` and the run's data is
r3's recorded split (bot.evaluation.Evaluations.prepare), so both models are
judged on the same examples. The hyperparameters are carried by `MAPPING`,
one row per target kind; what has no equivalent there is listed on the
card with the reason (`WHY`).

When the new run succeeds and its own evaluation has ended (the comparison is
Evaluations.after_success's `then`), `Migrations.after_success` compares both
models on the held-out prompts: the new model's answers are the ones its
evaluation just got when that evaluation was made on exactly these examples
(same lines, same order, same prompts and references: `stored_evaluation`),
else (not evaluated, failed answers, another set: said in the thread) it is
asked again; the old model is asked while it still serves, else its stored
answers from its own evaluation stand in. It posts in the thread how much of the old model's
quality the new one keeps (its mean primary score as a share of the old
one's, with win / tie / loss per example) and what 1,000 calls cost on each:
the held-out set's average prompt and reference-answer tokens (o200k_base) at
each model's inference price per token (Evaluations.prices_for: trainers.pricing's
table for OpenAI, TUNEBOT_PRICES' together.sizes inference_per_1m for Together,
the providers file's for another host); a local model has no hosted cost. A
hosted model is asked on its own host (Evaluations.client_for). A migration
whose models could not be priced there is refused when asked, in one sentence
naming what to add, not after training. Hosted answers are paid: the
comparison reserves the estimate of what it will ask (reused answers cost
nothing) through the spend gate first and settles at what it spent.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bot import render
from bot.errors import Busy, SpendRefused, UserError
from bot.results import RunResult

if TYPE_CHECKING:
    from bot.commands import Command
    from bot.context import Context
    from bot.datasets import Datasets
    from bot.evaluation import Evaluations
    from bot.run_service import RunService
    from storage import Run

log = logging.getLogger("tunebot")

NOT_TRAINING = ("eval", "distill")  # run kinds that train no model
OPEN = ("pending_approval", "approved", "queued", "submitting", "running")  # not ended yet

# Target kind -> {a stored plan's field: the /finetune train option it becomes there,
# or None when the target has no equivalent (WHY says why)}. A field a source plan
# does not have, has as None (auto), or has at its default (DEFAULT) is not carried.
# Targets: "openai" (OpenAI and openai-compatible hosts: n_epochs, batch_size,
# learning_rate_multiplier), "local" (LoRA: epochs, per-device batch, absolute lr, rank,
# alpha), "together" (Together's n_epochs, batch_size, absolute learning_rate, lora_r,
# lora_alpha, lora_dropout, suffix, and lora=false for training every weight;
# Planner.together takes these short names as well as Together's own).
MAPPING: dict[str, dict[str, str | None]] = {
    "openai": {
        "epochs": "epochs", "batch": "batch", "lr_mult": "lr_mult", "suffix": "suffix",
        "lr": None, "r": None, "alpha": None, "targets": None, "max_length": None,
        "qlora": None, "merge": None, "lora": None, "dropout": None,
    },
    "local": {
        "epochs": "epochs", "batch": "batch", "lr": "lr", "r": "r", "alpha": "alpha",
        "targets": "targets", "max_length": "max_length", "qlora": "qlora", "merge": "merge",
        "lr_mult": None, "suffix": None, "lora": None, "dropout": None,
    },
    "together": {
        "epochs": "epochs", "batch": "batch", "lr": "lr", "r": "r", "alpha": "alpha",
        "dropout": "lora_dropout", "lora": "lora", "suffix": "suffix", "lr_mult": None,
        "targets": None, "max_length": None, "qlora": None, "merge": None,
    },
}  # fmt: skip
# A stored plan's field at this value is the default everywhere it exists: not carried.
DEFAULT: dict[str, Any] = {"lora": True, "qlora": False, "merge": False}
WHOLE = ("epochs", "batch", "r", "alpha")  # counts: 32.0 (Together's alpha) carries as 32
WHY: dict[str, str] = {
    "lr_mult": "OpenAI's learning-rate multiplier scales a base rate OpenAI does not "
    "publish, so it has no absolute learning rate to carry",
    "lr": "OpenAI takes a multiplier of its own base rate, not an absolute learning rate",
    "suffix": "a suffix names a hosted fine-tuned model; a local adapter is named by its run id",
    "r": "the LoRA rank is not an option there",
    "alpha": "the LoRA alpha is not an option there",
    "targets": "the LoRA target modules are not an option there",
    "max_length": "the example length limit is the provider's own there",
    "qlora": "4-bit base weights are a local option",
    "merge": "a merged copy is a local option",
    "lora": "only Together chooses between a LoRA adapter and training every weight",
    "dropout": "the LoRA dropout is a Together option",
}


@dataclass(frozen=True)
class Mapped:
    """A source plan's hyperparameters for a target: `options` (/finetune train's
    names, as text), `carried` ("epochs 3 → epochs=3") and `dropped` ((field, value,
    why) for each set field with no equivalent there)."""

    options: dict[str, str]
    carried: tuple[str, ...]
    dropped: tuple[tuple[str, Any, str], ...]


def map_hyperparameters(source: Mapping[str, Any], target: str) -> Mapped:
    """Carry a stored plan's (`TrainingPlan.to_json()`) hyperparameters to `target`
    ("openai", "local" or "together": see MAPPING). Epochs carry as the number the
    source trained (an auto choice becomes fixed); auto batch sizes are left to the
    target. Raises ValueError for a target MAPPING does not have."""
    if target not in MAPPING:
        raise ValueError(f"no hyperparameter mapping to {target!r}; targets: {', '.join(MAPPING)}")
    options: dict[str, str] = {}
    carried: list[str] = []
    dropped: list[tuple[str, Any, str]] = []
    for field_name, option in MAPPING[target].items():
        value = source.get(field_name)
        if value is None or (field_name in DEFAULT and value == DEFAULT[field_name]):
            continue
        if option is None:
            dropped.append((field_name, value, WHY[field_name]))
            continue
        if field_name in WHOLE and isinstance(value, float) and value.is_integer():
            value = int(value)
        text = str(value).lower() if isinstance(value, bool) else str(value)
        options[option] = text
        auto = " (its auto choice)" if field_name == "epochs" and source.get("epochs_auto") else ""
        carried.append(f"{field_name} {value}{auto} → {option}={text}")
    return Mapped(options, tuple(carried), tuple(dropped))


def differences(source: Mapping[str, Any], new: Mapping[str, Any], mapped: Mapped) -> list[str]:
    """The lines an approver reads: what the migration changes and why, given the
    source plan, the new plan (both stored dicts) and what `map_hyperparameters` did."""
    out = [
        f"base model {source.get('model')} ({source.get('provider')}) → {new.get('model')} "
        f"({new.get('provider')}): another model, so quality can move either way; the "
        "comparison after training says how much of it is kept"
    ]
    for name, value, why in mapped.dropped:
        line = f"{name} {value} not carried: {why}"
        host = render.provider_name(str(new.get("provider")))
        if name == "lr_mult" and new.get("lr") is not None:
            line += f"; the new run trains at lr={new['lr']:g}"
        elif name == "lr_mult" and new.get("kind") == "together":
            line += f"; {host} uses its default learning rate"
        elif name == "lr" and new.get("lr_mult") is None:
            line += f"; {host} picks its multiplier (auto)"
        out.append(line)
    if source.get("provider") == "openai" and source.get("batch") is None and new.get("batch"):
        out.append(f"batch was OpenAI's auto choice; the new run uses batch={new['batch']}")
    if new.get("provider") == "local":
        out.append(
            f"trains a LoRA adapter (rank {new.get('r')}, alpha {new.get('alpha')}) on this "
            "machine's GPUs"
        )
    return out


class Migrations:
    """`request` answers /finetune migrate; `after_success` (a Runs.on_success hook)
    posts the comparison when a migrated run succeeds."""

    def __init__(
        self, ctx: Context, datasets: Datasets, runs: RunService, evals: Evaluations
    ) -> None:
        self.ctx = ctx
        self.datasets = datasets
        self.runs = runs
        self.evals = evals
        self.store = ctx.store
        self.settings = ctx.settings

    # --- the request ----------------------------------------------------------------------

    def target_kind(self, provider: str) -> str | None:
        """Which MAPPING row a provider takes: openai, local or together; a providers-file
        provider by its kind; None when this installation knows no such provider."""
        if provider in MAPPING:
            return provider
        configured = self.ctx.providers.get(provider)
        if configured is None:
            return None
        return "together" if configured.kind == "together" else "openai"

    def request(self, cmd: Command, channel: str, user: str) -> render.Message:
        source = self.runs.find_run(cmd.target, channel)
        if source.provider in NOT_TRAINING:
            raise UserError(f"{source.id} is not a training run: only a trained model migrates.")
        if source.status != "succeeded":
            raise UserError(
                f"{source.id} is {source.status.replace('_', ' ')}: only a succeeded run can "
                "be migrated (its model is what the new one is compared with)."
            )
        provider = cmd.options.get("provider", "").strip().lower()
        known = sorted({*MAPPING, *self.ctx.providers})
        if not provider:
            raise UserError(f"Name where to train: `provider=` one of {', '.join(known)}.")
        kind = self.target_kind(provider)
        if kind is None:
            raise UserError(
                f"No provider `{render.escape(provider)}` here: `provider=` takes "
                f"{', '.join(known)} (`/finetune providers` lists them)."
            )
        if source.provider != "local" or kind != "local":  # the comparison asks hosted models
            self.runs.gate.require(user, requester=source.requested_by, what=f"migrate {source.id}")
        dataset = self.datasets.find_dataset(channel, source.dataset_id)  # forgotten: says by whom
        report = self.datasets.stored_report(dataset)
        plan = source.plan_json or {}
        mapped = map_hyperparameters(plan, kind)
        opts = {**mapped.options, "provider": provider}
        if "model" in cmd.options:
            opts["model"] = cmd.options["model"]
        if plan.get("eval_dataset_id"):
            opts["eval"] = plan["eval_dataset_id"]
        elif plan.get("split"):
            opts["split"] = repr(plan["split"])
        unpriced = self.unpriced(source.provider, source.model)
        if unpriced:
            raise UserError(unpriced)
        new = self.runs.planner.plan(provider, dataset, report, opts, channel)
        if new.provider != provider:
            raise UserError(f"Runs on {provider} are not offered by this bot yet.")
        unpriced = self.unpriced(provider, new.model)  # refused now, not after training
        if unpriced:
            raise UserError(unpriced)
        stored = new.to_json()
        stored.update(
            migrated_from=source.id,
            carried=list(mapped.carried),
            differences=differences(plan, stored, mapped),
        )
        answer = self.runs.request_plan(
            stored, dataset, channel, user,
            unique=lambda: self._refuse_second(source.id, provider, new.model),
        )  # fmt: skip
        return render.note(
            f"Migrating {source.id} to {provider}: {answer.text} The plan lists what carries "
            "over and what differs."
        )

    def open_migration(self, source_id: str, provider: str, model: str) -> tuple[str, str] | None:
        """(run id, status) of a migration of `source_id` to `provider`'s `model` that has
        not ended: a run pending approval, queued or running, or a request recorded
        whose run is not written yet ("being recorded"); None when there is none."""
        for run in self.store.runs(status=list(OPEN), limit=None):
            plan = run.plan_json or {}
            if plan.get("migrated_from") == source_id and (run.provider, run.model) == (
                provider,
                model,
            ):
                return run.id, run.status.replace("_", " ")
        for work in self.store.pending_work("request"):
            args = (work.payload_json or {}).get("args") or {}
            plan = args.get("plan") or {}
            if (plan.get("migrated_from"), plan.get("provider"), plan.get("model")) == (
                source_id,
                provider,
                model,
            ) and self.store.find_run(args.get("run_id") or "") is None:
                return args.get("run_id") or "?", "being recorded"
        return None

    def _refuse_second(self, source_id: str, provider: str, model: str) -> None:
        """Raise UserError when `open_migration` finds one (called in the transaction
        that records the request, so of simultaneous asks one is recorded)."""
        found = self.open_migration(source_id, provider, model)
        if found is not None:
            run_id, status = found
            raise UserError(
                f"{source_id} is already being migrated to {provider} "
                f"(`{render.escape(model)}`) as {run_id} ({status}); `/finetune cancel "
                f"{run_id}` first to ask again."
            )

    def unpriced(self, provider: str, model: str) -> str | None:
        """The sentence refusing a migration whose comparison could not price `model`'s
        answers on `provider` (a host other than OpenAI with no inference price: see
        Evaluations.host_rates), or None when they can be priced or cost nothing."""
        if provider in ("local", "openai", *NOT_TRAINING):
            return None
        if self.evals.host_rates(provider, model) is not None:
            return None
        where = (
            "input_per_1m and output_per_1m for it to the providers file"
            if provider in self.ctx.providers
            else "inference_per_1m for its size to TUNEBOT_PRICES' together.sizes"
        )
        return (
            f"{render.escape(model)} has no inference price on {render.provider_name(provider)} "
            f"in tunebot's price table, so the comparison after training cannot be priced; "
            f"add {where}, then ask again."
        )

    # --- the comparison ------------------------------------------------------------------

    def after_success(self, run: Run) -> None:
        """A run succeeded: if it migrates another, compare the two on the held-out set
        (on a long job: local generation loads a model)."""
        source_id = (run.plan_json or {}).get("migrated_from")
        if not source_id:
            return
        self.ctx.submit(
            f"comparing {run.id} with {source_id}",
            lambda: self.compare(run.id),
            run.channel,
            run.thread_ts,
            long=True,
        )

    def after_restart(self, interrupted) -> None:
        """At start-up, for the evaluation reservations (storage.ledger.Reservation, kind
        "eval": ref ``rN`` for a run's evaluation, ``rN:compare`` for a comparison) a dead
        process left open and `SpendGate.recover` closed: the run's thread is told its
        evaluation or comparison was cut short, and a migrated run with no comparison
        recorded is compared now (through the gate again: what the dead process asked
        is counted at its estimate)."""
        seen: set[str] = set()
        for entry in interrupted:
            run_id, _, part = entry.ref.partition(":")
            run = self.store.find_run(run_id) if entry.kind == "eval" else None
            if run is None or run.id in seen or part not in ("", "compare"):
                continue
            seen.add(run.id)
            what = "comparison" if part else "evaluation"
            source = (run.plan_json or {}).get("migrated_from")
            redo = bool(source) and run.status == "succeeded"
            redo = redo and not RunResult.of(run).migration
            after = f"`/finetune eval {run.id}` asks again"
            if redo:
                try:
                    self.after_success(run)  # on a long job
                    after = f"comparing it with {source} again now"
                except Busy:  # the start goes on
                    log.warning("run %s: comparison not restarted: tunebot is busy", run.id)
                    after = f"its comparison with {source} could not start (tunebot is busy)"
            self.ctx.post(
                run.channel,
                run.thread_ts,
                render.note(
                    f"{run.id}: its {what} was interrupted by a restart of the bot (what it "
                    f"may have spent counts at its estimate); {after}."
                ),
            )

    def compare(self, run_id: str) -> None:
        """Old vs new on the new run's held-out set; the result is stored in the new run's
        result_json["migration"] and posted in its thread."""
        from trainers.evaluate import examples_from_file, score

        new = self.store.get_run(run_id)
        old = self.store.get_run(new.plan_json["migrated_from"])
        data = RunResult.of(new).data or {}
        if not data.get("eval_sha256"):
            self.ctx.post(
                new.channel,
                new.thread_ts,
                render.note(f"{new.id}: not compared with {old.id}: there is no held-out set."),
            )
            return
        examples = examples_from_file(self.ctx.blobs.path(data["eval_sha256"]))
        old_model, new_model = self.served_model(old), self.served_model(new)
        ends = self._serving_ends(old)
        ask_old = ends is None or self.runs.clock().date() < ends
        notes: list[str] = []
        if not ask_old:
            notes.append(
                f"{old.id}'s model stopped serving on {ends:%Y-%m-%d}, so its answers are "
                "the ones stored by its own evaluation"
            )
        if not ask_old:
            old_answers = self._stored_answers(old, examples)  # UserError: nothing to compare
        # r2's own evaluation (it ends before this runs: Evaluations.after_success's `then`)
        # asked its tuned model the same held-out examples: those answers are reused.
        new_answers, why_not = self.evaluated_answers(new, examples)
        if new_answers is None and why_not:
            notes.append(f"{why_not}, so its model was asked again")
        try:
            reservation = self._reserve(
                new, old, examples, ask_old=ask_old, ask_new=new_answers is None
            )
        except SpendRefused as exc:
            self.ctx.post(
                new.channel,
                new.thread_ts,
                render.note(f"{new.id}: not compared with {old.id}: {exc.summary}"),
            )
            return
        spent = 0.0
        try:
            if ask_old:
                old_answers, cost = self.answers(old, examples)
                spent += cost
            if new_answers is None:
                new_answers, cost = self.answers(new, examples)
                spent += cost
                answered = "asked"
            else:
                answered = "its evaluation"
        finally:
            if reservation is not None:
                self.runs.gate.ledger.settle(reservation.id, spent)
        from bot.evaluation import _embedder

        result = score(examples, old_answers, new_answers, embedder=_embedder())
        summary = result.summary()
        kept = summary.tuned / summary.base if summary.base else None
        per_1k = {"old": self.per_1k_calls(old, examples), "new": self.per_1k_calls(new, examples)}
        record = {
            "from": old.id,
            "primary": result.primary,
            "old": summary.base,
            "new": summary.tuned,
            "kept": kept,
            "win_tie_loss": {"win": result.wins, "tie": result.ties, "loss": result.losses},
            "examples": len(examples),
            "per_1k_calls_usd": per_1k,
            "cost_usd": spent,
            "answers_from": {"old": "asked" if ask_old else "its evaluation", "new": answered},
            "notes": notes,
            "rows": [{"index": r.index, "old": r.base, "new": r.tuned} for r in result.rows],
        }
        with self.store.transaction():  # what else the run recorded meanwhile stays
            recorded = RunResult.of(self.store.get_run(new.id)).with_(migration=record)
            self.store.update_run(new.id, result_json=recorded.to_json())
        self.store.audit(
            "tunebot", "migration_compared", run_id=new.id, plan_hash=new.plan_hash,
            detail={k: v for k, v in record.items() if k != "rows"},
        )  # fmt: skip
        self.ctx.post(
            new.channel, new.thread_ts, comparison(new, old, old_model, new_model, record)
        )

    def served_model(self, run: Run) -> str:
        """The name a run's model answers to: the provider's fine-tuned id, or for a
        local run its base and adapter."""
        tuned = RunResult.of(run).fine_tuned_model
        if run.provider == "local" or not tuned:
            return f"{run.model} + LoRA {run.id}"
        return tuned

    def _serving_ends(self, run: Run):
        """The day OpenAI stops serving the run's model; None off OpenAI's API (local,
        Together, an openai-compatible host: OpenAI's dates are not theirs)."""
        from bot.retirement import ELSEWHERE_KINDS
        from trainers.retirement import serving_ends

        configured = self.ctx.providers.get(run.provider)
        if run.provider in ("local", "together") or (
            configured is not None and configured.kind in ELSEWHERE_KINDS
        ):
            return None
        return serving_ends(self.served_model(run))

    def answers(self, run: Run, examples) -> tuple[list, float]:
        """(the run's model's answers to `examples`, their cost in USD). A hosted model is
        asked through its host's chat completions (Evaluations.client_for: OpenAI, Together
        at its /v1, a providers-file host) and priced at that host's inference price
        (Evaluations.prices_for); only the tuned model is asked."""
        from trainers.evaluate import generate_local, generate_openai, generation_cost

        evals = self.evals
        if run.provider == "local":
            from bot.local_models import LocalModels

            adapter = RunResult.of(run).adapter_dir
            if not adapter:
                raise UserError(f"{run.id} has no adapter to compare.")
            base = LocalModels(self.settings, self.store).trained_base(run)
            return generate_local(base, adapter, examples)[1], 0.0
        model = RunResult.of(run).fine_tuned_model
        if not model:
            raise UserError(f"{run.id} has no fine-tuned model id to compare.")
        prices = evals.prices_for(run, model)  # before anything is asked: UserError without one
        answers = generate_openai(
            evals.client_for(run), model, examples, concurrency=self.settings.eval_concurrency
        )
        return answers, generation_cost(model, answers, prices) or 0.0

    def stored_evaluation(self, run: Run, examples):
        """The rows (trainers.evaluate.Row) of `run`'s latest stored evaluation made on
        exactly `examples`: the same held-out examples in the same order, each row's
        index (line number), prompt text and reference answer equal to the example's.
        None when no stored evaluation of it is (another split, another eval set, an
        evaluation from before a change of the data, unreadable rows). A local evaluation
        of a downloaded Together adapter (summary "local") is not the hosted model the
        comparison names and prices, so it is never taken."""
        from trainers.evaluate import EvalResult

        wanted = [(e.index, e.prompt_text, e.reference) for e in examples]
        for stored in reversed(self.store.evals(run.id)):
            if (stored.summary_json or {}).get("local"):
                continue  # a downloaded adapter answered here (bot/offline.py), not the model
            try:
                rows = EvalResult.from_dict(stored.rows_json).rows
            except ValueError:
                continue
            if [(r.index, r.prompt, r.reference) for r in rows] == wanted:
                return rows
        return None

    def evaluated_answers(self, run: Run, examples) -> tuple[list | None, str | None]:
        """(the tuned answers (trainers.evaluate.Generation) of `run`'s own evaluation on
        `examples`, None) when one stored evaluation has them all (`stored_evaluation`);
        else (None, why not: a phrase for the thread, or None when `run` was simply
        never evaluated or its evaluation did not end)."""
        from trainers.evaluate import Generation

        rows = self.stored_evaluation(run, examples)
        if rows is None:
            if self.store.evals(run.id):
                return None, f"{run.id}'s own evaluation was not on these held-out examples"
            return None, None
        failed = sum(1 for r in rows if r.tuned_error)
        if failed:
            return None, f"{failed} of {run.id}'s answers in its own evaluation failed"
        return [Generation(r.tuned) for r in rows], None

    def _stored_answers(self, run: Run, examples) -> list:
        """The tuned answers of `run`'s latest evaluation on exactly `examples`
        (`stored_evaluation`), a failed one as its error. UserError when none covers them."""
        from trainers.evaluate import Generation

        rows = self.stored_evaluation(run, examples)
        if rows is None:
            raise UserError(
                f"{run.id}'s model no longer serves and no stored evaluation of it was made "
                "on this held-out set, so there is nothing to compare with."
            )
        return [Generation(r.tuned, r.tuned_error) for r in rows]

    def _reserve(self, new: Run, old: Run, examples, *, ask_old: bool, ask_new: bool = True):
        """Reserve what will be asked of hosted models (every answer at its token limit)
        through the spend gate: the old model when `ask_old`, the new one when `ask_new`
        (not when its evaluation's answers are reused). None when nothing hosted is
        asked. Raises SpendRefused over the budget."""
        from trainers.evaluate import ANSWER_MAX_TOKENS

        tokens_in = sum(len(e.prompt_text) for e in examples) // 4 + 1  # ~4 characters a token
        tokens_out = len(examples) * ANSWER_MAX_TOKENS
        usd = 0.0
        for run in ((old,) if ask_old else ()) + ((new,) if ask_new else ()):
            if run.provider != "local":
                usd += self.price(run, tokens_in, tokens_out) or 0.0
        if usd <= 0:
            return None
        return self.runs.gate.reserve(
            "eval", f"{new.id}:compare", usd, what=f"Comparing {new.id} with {old.id}",
            run_id=new.id, channel=new.channel,
        )  # fmt: skip

    def per_1k_calls(self, run: Run, examples) -> float | None:
        """USD for 1,000 calls of the held-out set's average size (o200k_base tokens of
        each prompt's text and reference answer) at the run's model's inference price
        (`price`); 0.0 for a local model (no hosted cost); None when no price is known."""
        from trainers.tokens import tiktoken_encoding

        if run.provider == "local":
            return 0.0
        encoding = tiktoken_encoding("o200k_base")
        n = len(examples)
        tokens_in = sum(len(encoding.encode(e.prompt_text)) for e in examples) / n
        tokens_out = sum(len(encoding.encode(e.reference)) for e in examples) / n
        return self.price(run, round(tokens_in * 1000), round(tokens_out * 1000))

    def price(self, run: Run, tokens_in: int, tokens_out: int) -> float | None:
        """USD for `tokens_in` prompt and `tokens_out` answer tokens of a hosted run's tuned
        model at its host's inference price (Evaluations.prices_for: trainers.pricing's
        table for OpenAI, the price file's Together rate or the providers file's for
        another host); None when none is known."""
        from trainers.pricing import inference_cost

        model = RunResult.of(run).fine_tuned_model or run.model
        try:
            return inference_cost(model, tokens_in, tokens_out, self.evals.prices_for(run, model))
        except (ValueError, UserError):
            return None


def comparison(new: Run, old: Run, old_model: str, new_model: str, record: dict) -> render.Message:
    """The thread's answer: the share of the old model's quality kept, per-example
    win / tie / loss, and the price of 1,000 calls on each."""
    kept = record["kept"]
    share = f"{kept:.0%}" if kept is not None else "an unknown share (the old score is 0)"
    wtl = record["win_tie_loss"]
    scores = (
        f"{record['primary']} {record['new']:.3f} vs {record['old']:.3f}"
        if record["new"] is not None and record["old"] is not None
        else f"{record['primary']}: no valid scores"
    )

    def price(usd: float | None, run: Run) -> str:
        if run.provider == "local":
            return "$0 hosted cost (it runs on your own GPUs)"
        return "unknown (no price in the table)" if usd is None else f"${usd:,.2f}"

    per_1k = record["per_1k_calls_usd"]
    lines = [
        f"{new.id} vs {old.id} on the same {record['examples']} held-out examples: "
        f"{new.id} keeps {share} of {old.id}'s quality ({scores}); per example it wins "
        f"{wtl['win']}, ties {wtl['tie']}, loses {wtl['loss']}.",
        f"1,000 calls like these: {old.id} `{render.escape(old_model)}` "
        f"{price(per_1k['old'], old)}; {new.id} `{render.escape(new_model)}` "
        f"{price(per_1k['new'], new)}.",
        *(f"Note: {n}." for n in record["notes"]),
    ]
    return render.note(render.short_paths("\n".join(lines)))  # a folder model by its name
