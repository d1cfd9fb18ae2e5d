"""The `tidings` command: up, token, demo, events tail, dlq, chaos, bench."""

from __future__ import annotations

import argparse
import asyncio
import sys

from observability.logging import configure_logging
from services.runtime.config import load_settings
from services.runtime.errors import ConfigurationError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number; use 1 or more")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; use 0 (no limit) or more")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidings", description="Run and inspect the Tidings reference system."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser(
        "up",
        help="start nats-server (unless NATS_URL is set) and every service; Ctrl-C stops all",
    )
    up.add_argument(
        "--nats-cluster", type=_positive_int, default=1, metavar="N",
        help="start N clustered nats-servers on loopback instead of one (streams get "
        "min(N, 3) replicas unless TIDINGS_STREAM_REPLICAS is set)",
    )

    up.add_argument("--no-gateway", action="store_true", help="start the services without the gateway")
    up.add_argument(
        "--log-format", choices=("auto", "text", "json"), default="auto",
        help="how to print the services' logs: text lines in columns, or their JSON lines as "
        "they are (default: text at a terminal, json otherwise)",
    )

    token = commands.add_parser(
        "token", help="print a bearer token for the gateway of a local `tidings up` (HS256)"
    )
    token.add_argument("--subject", default="developer", help="the token's sub claim (default developer)")
    token.add_argument(
        "--scope", action="append", default=None,
        help="a scope to grant, such as orders:write; repeat for several (default: every scope)",
    )
    token.add_argument("--lifetime", type=_positive_int, default=3600,
                       help="seconds until the token expires (default 3600)")

    demo = commands.add_parser("demo", help="drive a scenario through a running system")
    demo.add_argument(
        "--users", type=_positive_int, default=3, help="number of users to create (default 3)"
    )
    demo.add_argument(
        "--timeout", type=float, default=30.0,
        help="seconds to wait for each notification and for each order's final state (default 30)",
    )
    demo.add_argument(
        "--via-gateway", action="store_true",
        help="send every call through the HTTP gateway with a token signed by the local HS256 secret, "
        "instead of gRPC straight to the services",
    )
    demo.add_argument(
        "--gateway-url", default=None, metavar="URL",
        help="base URL of the gateway; implies --via-gateway "
        "(default http://TIDINGS_HOST:TIDINGS_GATEWAY_PORT)",
    )

    events = commands.add_parser("events", help="inspect events on NATS")
    event_commands = events.add_subparsers(dest="events_command", required=True)
    tail = event_commands.add_parser("tail", help="print events as they arrive, decoded")
    tail.add_argument(
        "subject", nargs="?", default="tidings.>",
        help="subject filter with NATS wildcards (default tidings.>)",
    )
    tail.add_argument(
        "--count", type=_non_negative_int, default=0,
        help="exit after this many events (default: run until Ctrl-C)",
    )

    from services.runtime.cli.dlq import add_arguments as add_dlq_arguments

    add_dlq_arguments(commands)

    chaos = commands.add_parser(
        "chaos", help="run fault scenarios under load and report lost or twice-applied events"
    )
    chaos.add_argument("--size", type=_positive_int, default=400,
                       help="PlaceOrder and UpdateUser calls per scenario; cancellations come on top "
                       "(default 400)")
    chaos.add_argument("--output", default=None,
                       help="Markdown file to write the results to (default: print only)")
    chaos.add_argument("--scenario", action="append", default=None,
                       help="run only this scenario (nats-kill, service-kill, consumer-pause, "
                       "replica-kill, cluster-node-kill); repeat for several")

    bench = commands.add_parser("bench", help="measure the main path against raw grpc and nats")
    bench.add_argument("--calls", type=int, default=2000, help="calls per measured phase")
    bench.add_argument("--concurrency", type=int, default=32, help="calls in flight at once")
    bench.add_argument(
        "--rounds", type=int, default=3,
        help="rounds of the CreateUser phases; the page reports the round with the median calls/s",
    )
    bench.add_argument(
        "--output", default=None, help="Markdown file to write the results to (default: print only)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the `tidings` command line."""
    options = _parser().parse_args(argv)
    configure_logging("tidings-cli", "WARNING")
    try:
        settings = load_settings()
        code = asyncio.run(_dispatch(options, settings))
    except ConfigurationError as exc:
        print(f"tidings: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


async def _dispatch(options: argparse.Namespace, settings: object) -> int:
    # Imported per command so that `tidings events tail` does not load gRPC
    # service stubs and `tidings up` does not load the benchmark.
    from services.runtime.config import Settings

    assert isinstance(settings, Settings)
    if options.command == "up":
        from services.runtime.cli.supervisor import Supervisor

        return await Supervisor(
            settings, nats_cluster=options.nats_cluster, gateway=not options.no_gateway,
            log_format=options.log_format,
        ).run()
    if options.command == "token":
        from services.runtime.cli.token import print_token

        return print_token(settings, options.subject, options.scope, options.lifetime)
    if options.command == "demo":
        from services.runtime.cli.demo import run_demo

        return await run_demo(
            settings,
            users=options.users,
            timeout=options.timeout,
            via_gateway=options.via_gateway or options.gateway_url is not None,
            gateway_url=options.gateway_url,
        )
    if options.command == "events":
        from services.runtime.cli.tail import tail_events

        return await tail_events(settings, options.subject, count=options.count)
    if options.command == "dlq":
        from services.runtime.cli.dlq import run_dlq

        return await run_dlq(settings, options)
    if options.command == "chaos":
        from pathlib import Path

        from bench.chaos import SCENARIOS, run_chaos

        chosen = options.scenario or list(SCENARIOS)
        unknown = [name for name in chosen if name not in SCENARIOS]
        if unknown:
            print(f"tidings chaos: unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
            return 2
        return await run_chaos(options.size, Path(options.output) if options.output else None, chosen)
    if options.command == "bench":
        from bench.harness import run_benchmark

        return await run_benchmark(
            calls=options.calls, concurrency=options.concurrency, output=options.output,
            rounds=options.rounds,
        )
    raise AssertionError(f"unhandled command {options.command}")
