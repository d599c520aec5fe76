"""Helpers shared by the test modules (importable because pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

from cnl.cli import main


def run_cli(argv: list[str]) -> int:
    """``cnl.cli.main(argv)``'s exit status, whether it returns or raises ``SystemExit`` (argparse)."""
    try:
        return main(argv)
    except SystemExit as e:
        code = e.code
        return 0 if code is None else code if isinstance(code, int) else 1
