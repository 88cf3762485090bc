"""The exception tree. Every error a user can cause maps to an exit code, like make's.

0 ok, 1 the build failed, 2 a usage, Mergefile or input error (nothing was written).
"""

from __future__ import annotations


class MergebuildError(Exception):
    """Base of all errors mergebuild reports to the user as one line, without a traceback."""

    exit_code = 1


class UsageError(MergebuildError):
    """Wrong command-line use."""

    exit_code = 2


class MergefileError(MergebuildError):
    """The Mergefile is wrong: the message names the file, the table and the field."""

    exit_code = 2

    def __init__(self, path, table: str | None, field: str | None, message: str):
        self.path, self.table, self.field = path, table, field
        where = str(path)
        if table:
            where += f": [{table}]"
        if field:
            where += f" {field}"
        super().__init__(f"{where}: {message}")


class InputError(MergebuildError):
    """A source model cannot be used (missing, corrupt, mismatched shapes)."""

    exit_code = 2


class BuildError(MergebuildError):
    """The build itself failed (a method raised, the disk is full)."""

    exit_code = 1
