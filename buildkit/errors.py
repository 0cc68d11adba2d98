"""The toolkit's errors: one base, LmiError, carries one message per problem and the exit code the CLI
returns for it, so `cli.main` reads `exit_code` once instead of knowing every kind of error."""

from __future__ import annotations


class LmiError(Exception):
    """A failure the user can act on: `lines` holds one message per problem; exit 1 unless a subclass
    says otherwise. Printed without a traceback (`--debug` shows it)."""

    exit_code = 1
    prefix = "error: "  # what the CLI prints before each line

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines) or [self.__class__.__name__]


class UserError(LmiError):
    """Bad input: a file, a flag or a combination the user can correct (exit 2).

    Each line is already formatted as `file:line: what; how to fix`, and printed as it is.
    """

    exit_code = 2
    prefix = ""


def where(path: object, line: int | None) -> str:
    """`path:line` prefix for a message (just `path` when the line is unknown)."""
    return f"{path}:{line}" if line else f"{path}"
