"""Errors the user can fix. The CLI prints them as one line each and exits 2, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a file, a flag or a combination the user can correct.

    `lines` holds one message per problem, already formatted as `file:line: what; how to fix`.
    """

    exit_code = 2

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)


def where(path: object, line: int | None) -> str:
    """`path:line` prefix for a message (just `path` when the line is unknown)."""
    return f"{path}:{line}" if line else f"{path}"
