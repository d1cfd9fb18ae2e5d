"""Run the benchmark without the `tidings` command: ``python -m bench --calls N --concurrency C``."""

from __future__ import annotations

import argparse
import asyncio

from bench.harness import run_benchmark


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Measure the main path against raw grpc and nats."
    )
    parser.add_argument("--calls", type=int, default=2000, help="calls per measured phase")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight at once")
    parser.add_argument(
        "--output", default=None, help="Markdown file to write the results to (default: print only)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run the benchmark and exit with its code."""
    options = _parser().parse_args(argv)
    try:
        code = asyncio.run(
            run_benchmark(calls=options.calls, concurrency=options.concurrency, output=options.output)
        )
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
