"""Errors a user can cause and fix: they are reported as one line, never a traceback.

::

    KikiError
    ├── InputError          bad input file, row or field (exit code 2)
    └── ConfigurationError  bad settings, unknown target, missing credentials (exit code 2)
"""

from __future__ import annotations


class KikiError(Exception):
    """Base class of errors that are reported to the user as one line."""

    exit_code = 2


class InputError(KikiError):
    """Bad input data: names the file, the row (1-based, header is row 1) and the field.

    Args:
        message: What is wrong, in the user's terms.
        file: The file (or URL) the value came from.
        row: The row or record number in that file.
        field: The column or field name.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.row = row
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = [part for part in (self.file, self._row_text(), self._field_text()) if part]
        return f"{', '.join(where)}: {self.message}" if where else self.message

    def _row_text(self) -> str | None:
        return None if self.row is None else f"row {self.row}"

    def _field_text(self) -> str | None:
        return None if self.field is None else f"field '{self.field}'"

    def located(self, *, file: str | None = None, row: int | None = None) -> InputError:
        """Return a copy of this error with the file and row filled in where missing."""
        return InputError(
            self.message,
            file=self.file or file,
            row=self.row if self.row is not None else row,
            field=self.field,
        )


class ConfigurationError(KikiError):
    """Bad configuration: unknown target, missing credentials, malformed settings."""
