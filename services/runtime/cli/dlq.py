"""`tidings dlq`: list, show, replay and purge dead letters."""

from __future__ import annotations

import argparse
import json

import nats
from google.protobuf.json_format import MessageToDict

from observability.logging import redact_url
from services.runtime.cli.supervisor import discover_nats_url
from services.runtime.cli.tail import CONNECT_ATTEMPTS, EVENT_MODULES, ignore_error
from services.runtime.config import Settings
from services.runtime.deadletters import (
    HEADER_PREFIX,
    DeadLetter,
    DeadLetterStreamMissing,
    purge,
    read_dead_letters,
    replay,
    select_dead_letters,
)
from services.runtime.events import EventDecodeError, decode_event

assert EVENT_MODULES  # imported so that event types decode by name


def add_arguments(commands: argparse._SubParsersAction) -> None:
    """Add the `dlq` command and its subcommands to the parser."""
    dlq = commands.add_parser("dlq", help="inspect, replay and purge dead letters")
    actions = dlq.add_subparsers(dest="dlq_command", required=True)
    actions.add_parser("list", help="list dead letters, one line each", parents=[_filters()])
    actions.add_parser("show", help="print dead letters in full", parents=[_filters()])
    actions.add_parser(
        "replay", parents=[_filters()],
        help="publish the chosen dead letters again on their subjects and delete them",
    )
    actions.add_parser("purge", parents=[_filters()], help="delete the chosen dead letters")


def _filters() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("sequences", nargs="*", type=int, metavar="SEQ",
                        help="dead-letter sequence numbers, as `tidings dlq list` prints them")
    parser.add_argument("--id", dest="event_ids", action="append", default=[],
                        help="event id (ce-id); repeat for several")
    parser.add_argument("--consumer", help="durable consumer that gave up, such as notifications-users")
    parser.add_argument("--subject", help="original subject, such as tidings.users.user.created")
    parser.add_argument("--all", action="store_true", help="replay or purge every dead letter")
    return parser


async def run_dlq(settings: Settings, options: argparse.Namespace) -> int:
    """Run one `tidings dlq` subcommand; return the exit code."""
    has_filter = bool(options.sequences or options.event_ids or options.consumer or options.subject)
    if options.dlq_command in ("replay", "purge") and not (has_filter or options.all):
        print(f"tidings dlq {options.dlq_command}: choose dead letters by SEQ, --id, --consumer or "
              "--subject, or pass --all")
        return 2

    url = discover_nats_url(settings)
    try:
        client = await nats.connect(
            servers=url.split(","), name="tidings-dlq", connect_timeout=2,
            max_reconnect_attempts=CONNECT_ATTEMPTS, allow_reconnect=False, error_cb=ignore_error,
        )
    except (nats.errors.NoServersError, OSError, TimeoutError) as exc:
        print(f"cannot connect to NATS at {redact_url(url)}: {exc}; start the system with "
              "`tidings up` or set NATS_URL to a running server")
        return 1
    try:
        js = client.jetstream()
        try:
            stored = await read_dead_letters(js)
        except DeadLetterStreamMissing as exc:
            print(f"tidings dlq: {exc} (used {redact_url(url)})")
            return 1
        letters = select_dead_letters(
            stored,
            sequences=options.sequences, event_ids=options.event_ids,
            consumer=options.consumer, subject=options.subject,
        )
        if not letters and options.dlq_command != "list":
            print("no dead letter matches; `tidings dlq list` shows them all")
        if options.dlq_command == "list":
            for letter in letters:
                print(_summary(letter))
            print(f"{len(letters)} dead letter(s)")
        elif options.dlq_command == "show":
            for letter in letters:
                print(json.dumps(_details(letter), indent=2))
        elif options.dlq_command == "replay":
            for letter in letters:
                await replay(js, letter)
                print(f"replayed {letter.sequence}: event {letter.event_id} on {letter.subject}")
        else:
            for letter in letters:
                await purge(js, letter)
                print(f"purged {letter.sequence}: event {letter.event_id}")
    finally:
        await client.close()
    return 0


def _summary(letter: DeadLetter) -> str:
    headers = letter.headers
    return (f"{letter.sequence}  {headers.get(f'{HEADER_PREFIX}Time', '')}  {letter.consumer}  "
            f"{letter.subject}  event {letter.event_id or '-'}  "
            f"{headers.get(f'{HEADER_PREFIX}Reason', '')}: {headers.get(f'{HEADER_PREFIX}Error', '')}")


def _details(letter: DeadLetter) -> dict[str, object]:
    entry: dict[str, object] = {"sequence": letter.sequence, "headers": dict(letter.headers)}
    try:
        event = decode_event(letter.original_headers(), letter.data)
        entry["payload"] = MessageToDict(event.message())
    except EventDecodeError as exc:
        entry["payload_error"] = str(exc)
        entry["size"] = len(letter.data)
    return entry
