"""Run the `tidings` command as ``python -m services.runtime.cli``."""

from services.runtime.cli import main

main()
