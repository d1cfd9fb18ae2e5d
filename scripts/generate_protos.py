"""Generate the Python protobuf and gRPC modules under tidings/ from protos/.

Run with ``--check`` to fail when the committed modules differ from what the
protos generate (CI's stale-codegen check).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import google.api
import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUTPUT = ROOT / "tidings"
WELL_KNOWN = Path(grpc_tools.__file__).parent / "_proto"
# googleapis-common-protos installs google/api/*.proto next to its modules.
GOOGLEAPIS = Path(next(iter(google.api.__path__))).parent.parent
# buf resolves imports only inside its workspace, and BSR dependencies would
# need the network, so the googleapis files our protos import are copied here
# (ignored by git) and listed as a second module in buf.yaml.
BUF_THIRD_PARTY = ROOT / "build" / "third_party_protos"
THIRD_PARTY_IMPORTS = ("google/api/annotations.proto", "google/api/http.proto")


def generate(output: Path) -> None:
    """Run protoc over every .proto file, writing modules and stubs to output."""
    sources = sorted(str(path.relative_to(PROTOS)) for path in PROTOS.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTOS}",
        f"--proto_path={WELL_KNOWN}",
        f"--proto_path={GOOGLEAPIS}",
        f"--python_out={output}",
        f"--pyi_out={output}",
        f"--grpc_python_out={output}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see its output above")

    # Packages need __init__.py files so that `tidings.users.v1` imports.
    for directory in [output / "tidings", *(output / "tidings").rglob("*")]:
        if directory.is_dir() and directory.name != "__pycache__":
            (directory / "__init__.py").touch()


def copy_third_party_protos() -> None:
    """Put the googleapis protos our sources import where buf can read them."""
    for name in THIRD_PARTY_IMPORTS:
        target = BUF_THIRD_PARTY / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(GOOGLEAPIS / name, target)


def differences(left: Path, right: Path) -> list[str]:
    """List the files that differ between two generated trees."""
    compared = filecmp.dircmp(left, right, ignore=["__pycache__"])
    found = [*compared.left_only, *compared.right_only, *compared.diff_files]
    for name, sub in compared.subdirs.items():
        found.extend(f"{name}/{item}" for item in differences(Path(sub.left), Path(sub.right)))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if tidings/ is stale")
    options = parser.parse_args()
    copy_third_party_protos()

    with tempfile.TemporaryDirectory() as scratch:
        generate(Path(scratch))
        fresh = Path(scratch) / "tidings"
        if options.check:
            stale = differences(fresh, OUTPUT) if OUTPUT.exists() else ["tidings/"]
            if stale:
                print("generated code is stale: " + ", ".join(sorted(stale)), file=sys.stderr)
                print("run `make protos` and commit the result", file=sys.stderr)
                return 1
            print("generated code is up to date")
            return 0
        shutil.rmtree(OUTPUT, ignore_errors=True)
        shutil.copytree(fresh, OUTPUT, ignore=shutil.ignore_patterns("__pycache__"))
    print(f"generated {OUTPUT.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
