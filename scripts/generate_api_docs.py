"""Write gateway/api/openapi.json and gateway/api/asyncapi.json from the protos.

The documents come from the generated modules under tidings/ and the
comments in protos/. Run with ``--check`` to fail when a committed document
differs from what this script would write.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gateway.asyncapi import build_asyncapi
from gateway.openapi import build_openapi
from gateway.schemas import load_proto_comments

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUTPUT = ROOT / "gateway" / "api"
FIX = "run `python scripts/generate_api_docs.py` and commit the result"


def render(document: dict[str, Any]) -> str:
    """Return document as indented JSON with sorted keys and a final newline, so that output is stable."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def documents() -> dict[Path, str]:
    """Return the text of each API document, keyed by the path it is written to."""
    comments = load_proto_comments(PROTOS)
    return {
        OUTPUT / "openapi.json": render(build_openapi(comments)),
        OUTPUT / "asyncapi.json": render(build_asyncapi(comments)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="only compare: exit 1 if a committed document is stale"
    )
    options = parser.parse_args()

    fresh = documents()
    if options.check:
        stale = []
        for path, text in fresh.items():
            name = path.relative_to(ROOT)
            if not path.exists():
                stale.append(f"{name} is missing")
            elif path.read_text(encoding="utf-8") != text:
                stale.append(f"{name} is stale")
        if stale:
            for problem in stale:
                print(f"{problem}: {FIX}", file=sys.stderr)
            return 1
        print("API documents are up to date")
        return 0

    OUTPUT.mkdir(parents=True, exist_ok=True)
    for path, text in fresh.items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
