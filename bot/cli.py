"""`tunebot` on the command line: the same workflow as in Slack, with a terminal.

Exit codes: 0 when no finding is an error, 1 when any is, 2 when the file
cannot be opened, the arguments or the configuration are wrong, or anything
else stops the command (one line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bot.config import ConfigError, Settings
from bot.errors import BotError

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2


class UsageError(BotError):
    """Bad arguments or an unreadable file: one line for stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, not usage + traceback
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _positive_int(raw: str) -> int:
    """A count of at least 1, checked before anything is downloaded or trained."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tunebot", description="Fine-tune LLMs from Slack, or from here.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text in (
        ("validate", "check a chat JSONL training file: every problem, with its line"),
        ("estimate", "tokens and training cost of a chat JSONL file"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("file", help="chat fine-tuning JSONL file")
        p.add_argument("--model", help="model to estimate (default: TUNEBOT_DEFAULT_MODEL)")
        p.add_argument("--epochs", default="auto", help="1..25, or auto (OpenAI's rule)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
    conv = sub.add_parser(
        "convert", help="turn ShareGPT, Alpaca, CSV or JSON (array / pretty) data into chat JSONL"
    )
    conv.add_argument("file")
    conv.add_argument(
        "--from", dest="fmt", required=True, choices=("sharegpt", "alpaca", "csv", "json")
    )
    conv.add_argument("--out", help="where to write (default: FILE.chat.jsonl beside it)")
    models = sub.add_parser("models", help="models for local training")
    models_sub = models.add_subparsers(dest="models_command", required=True, parser_class=_Parser)
    fetch = models_sub.add_parser("fetch", help="fetch and convert a known model, offline-ready")
    fetch.add_argument("name", help="a known model name, e.g. smollm2")
    adv = sub.add_parser(
        "advise", help="should we fine-tune at all? (asks when run without options)"
    )
    adv.add_argument(
        "--problem",
        action="append",
        default=[],
        help="knowledge, format, style, cost or domain (repeatable)",
    )
    adv.add_argument("--calls-per-day", type=int, help="calls a day in production")
    adv.add_argument("--examples", type=int, help="good examples you have")
    adv.add_argument(
        "--tried",
        action="append",
        default=[],
        help="prompting, few_shot, structured_outputs or rag (repeatable)",
    )
    sub.add_parser("providers", help="hosted providers: which are configured, what each trains")
    dem = sub.add_parser(
        "demo", help="the whole loop offline: validate, train a LoRA on CPU, evaluate"
    )
    dem.add_argument(
        "--epochs", type=_positive_int, default=1, help="passes over the 100 conversations"
    )
    serve = sub.add_parser("serve", help="run the Slack bot")
    serve.add_argument("--http", action="store_true", help="serve HTTP instead of Socket Mode")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=3000)
    return parser


def main(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> int:
    args: argparse.Namespace | None = None
    try:
        args = _build_parser().parse_args(argv)
        settings = Settings.from_env(env)
        if args.command in ("validate", "estimate"):
            return _check_file(args, settings)
        if args.command == "demo":
            from bot.demo import demo

            return demo(settings, epochs=args.epochs)
        if args.command == "convert":
            return _convert(args, settings)
        if args.command == "advise":
            return _advise(args)
        if args.command == "models":
            return _models(args, settings)
        if args.command == "providers":
            return _providers(settings, env)
        if args.command == "serve":
            from bot.serve import serve

            return serve(settings, http=args.http, host=args.host, port=args.port)
    except (UsageError, ConfigError) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug or a broken environment: still one line, no traceback
        what = f"tunebot {args.command}" if args is not None else "tunebot"
        print(f"{what}: unexpected error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:299] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_file(args: argparse.Namespace, settings: Settings) -> int:
    from bot import render
    from trainers import pricing
    from trainers.data import validate

    try:
        epochs = pricing.parse_epochs(args.epochs)
    except ValueError as exc:
        raise UsageError(f"tunebot {args.command}: {exc}") from None
    prices = _price_table(settings)
    model_name = args.model or settings.default_model
    try:
        model = prices.resolve(model_name)
    except pricing.UnknownModel as exc:
        raise UsageError(f"tunebot {args.command}: {exc}") from None

    path = Path(args.file)
    if path.is_dir():
        raise UsageError(f"tunebot {args.command}: {path} is a folder, not a file")
    try:
        with open(path, "rb"):
            pass
        report = validate(
            path,
            context_tokens=model.context,
            max_file_bytes=settings.max_file_bytes,
            encoding=model.encoding,
        )
    except OSError as exc:
        raise UsageError(f"tunebot {args.command}: cannot open {path}: {exc.strerror}") from None

    counts = report.token_counts
    costs = pricing.cost_table(counts, prices, model.name, epochs)
    trainers = pricing.trainable_by(report.kind, images=bool(report.images))
    # Local GPU time only where local training takes the file (supervised text).
    by_local = any(t.provider == "local" for t in trainers)
    local = pricing.local_estimates(counts) if by_local else []
    if args.json:
        out = {
            "file": str(path),
            "kind": report.kind,  # supervised, preference or reinforcement
            "kinds": report.kinds,  # valid lines of each kind (more than one: mixed_kinds)
            "trainable_by": [t.to_dict() for t in trainers],
            "examples": report.examples,
            "valid_examples": report.valid_examples,
            # counts: every finding of each code; findings: the first of each code only
            "counts": report.counts_by_code(),
            "summary": report.summary(),
            "findings": [f.to_dict() for f in report.findings],
            "tokens": report.tokens.to_dict(),
            "images": report.images,
            "token_notes": list(report.token_notes),  # how approximate counts were made
            **costs.to_dict(),
            "local": [e.to_dict() for e in local],
        }
        sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
    elif args.command == "validate":
        text = render.validation_report(path.name, report, costs, local, trainers=trainers).text
        print(text)
    else:
        print(render.estimate_summary(path.name, report, costs, local).text)
    return EXIT_FINDINGS if report.has_errors else EXIT_OK


def _convert(args: argparse.Namespace, settings: Settings) -> int:
    from bot import render
    from trainers import pricing
    from trainers.convert import convert
    from trainers.data import validate

    source = Path(args.file)
    out = Path(args.out) if args.out else source.with_name(source.stem + ".chat.jsonl")
    try:
        result = convert(source, args.fmt)
    except OSError as exc:
        raise UsageError(f"tunebot convert: cannot read {source}: {exc}") from None
    for where, what in result.problems:
        print(f"{source.name} {where}: {what}", file=sys.stderr)
    for line in result.ignored_lines():
        print(f"{source.name}: {line} (not in the output)", file=sys.stderr)
    for notice in result.notices:
        print(f"{source.name}: {notice}", file=sys.stderr)
    if not result.examples:
        rows = len(result.problems)
        why = f"none of its {rows:,} rows converts (each listed above)" if rows else "no rows"
        print(f"tunebot convert: nothing converted from {source.name}: {why}", file=sys.stderr)
        return EXIT_FINDINGS
    result.write(out)
    summary = (
        f"{len(result.examples):,} examples written to {out}; "
        f"{len(result.problems):,} rows not converted"
    )
    if result.ignored:
        summary += f"; {len(result.ignored):,} fields ignored"
    print(summary)
    prices = _price_table(settings)
    model = prices.resolve(settings.default_model)
    report = validate(out, context_tokens=model.context, max_file_bytes=settings.max_file_bytes)
    costs = pricing.cost_table(report.token_counts, prices, model.name)
    text = render.validation_report(
        out.name, report, costs, pricing.local_estimates(report.token_counts)
    ).text
    if result.dropped:  # never a ✅ over a file that lost something on the way
        text = text.replace(
            "✅ ready to train",
            "⚠️ what was converted is ready to train, but not everything was (listed above)",
        ).replace("✅", "⚠️")
    print(text)
    return EXIT_FINDINGS if result.problems or report.has_errors else EXIT_OK


def _advise(args: argparse.Namespace) -> int:
    from trainers.advise import PROBLEMS, TRIED, Situation, advise

    problems, tried = list(args.problem), list(args.tried)
    calls, examples = args.calls_per_day, args.examples
    if not problems and sys.stdin.isatty():
        print("What is wrong today? (comma-separated)")
        for key, label in PROBLEMS.items():
            print(f"  {key:<10} {label}")
        problems = _split(input("> "))
        calls = _ask_int("How many calls a day? ")
        examples = _ask_int("How many good examples do you have? ")
        print("What have you tried? (comma-separated, empty for nothing)")
        for key, label in TRIED.items():
            print(f"  {key:<18} {label}")
        tried = _split(input("> "))
    try:
        situation = Situation(
            frozenset(p for item in problems for p in _split(item)),
            calls or 0,
            examples or 0,
            frozenset(t for item in tried for t in _split(item)),
        )
    except ValueError as exc:
        raise UsageError(f"tunebot advise: {exc}") from None
    print("\n".join(advise(situation).lines()))
    return EXIT_OK


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.replace(" ", ",").split(",") if part.strip()]


def _ask_int(prompt: str) -> int:
    answer = input(prompt).strip().replace(",", "")
    try:
        return int(answer or 0)
    except ValueError:
        raise UsageError(f"tunebot advise: {answer!r} is not a whole number") from None


def _models(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from trainers import models
    except ImportError as exc:  # the OpenAI-only install has no torch
        raise UsageError(
            f"tunebot models: install the [local] extra first ({exc.name} is missing)"
        ) from None
    if args.name not in models.KNOWN:
        raise UsageError(
            f"tunebot models fetch: unknown model {args.name!r}; known: {', '.join(models.KNOWN)}"
        )
    try:
        folder = models.fetch(
            args.name, settings.home / "models", log=lambda m: print(m, file=sys.stderr)
        )
    except models.ModelFetchError as exc:
        raise UsageError(f"tunebot models fetch: {exc}") from None
    print(folder)
    return EXIT_OK


def _price_table(settings: Settings):
    from trainers.pricing import PriceTable

    if settings.prices_file is None:
        return PriceTable()
    try:
        return PriceTable.from_file(settings.prices_file)
    except ValueError as exc:
        raise ConfigError(f"TUNEBOT_PRICES: {exc}") from None


def _providers(settings: Settings, env: dict[str, str] | None) -> int:
    """`tunebot providers`: the built-in ones and TUNEBOT_PROVIDERS', keys set or not."""
    from bot import render

    print(render.providers_list(configured_providers(settings), env).text)
    return 0


def configured_providers(settings: Settings) -> dict:
    """The providers file's providers by name ({} without one); UsageError if it is bad."""
    from trainers.providers import ProvidersFileError, load_optional

    try:
        return load_optional(settings.providers_file)
    except ProvidersFileError as exc:
        raise UsageError(f"TUNEBOT_PROVIDERS: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
