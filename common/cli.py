"""What every command-line entry point shares: how a refusal reaches the user."""

from __future__ import annotations

import sys


def print_error(message: str) -> None:
    """`error: <message>` as one write: the ranks of one launch share the launcher's pipe, and `print` writes the
    text and the newline separately, so two ranks' refusals could run together on one line."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
