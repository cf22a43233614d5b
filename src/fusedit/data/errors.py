"""The two ways a dataset can be refused, both raised before any training step."""

from __future__ import annotations

from fusedit.errors import UserInputError


class MetadataError(UserInputError):
    """The metadata file itself cannot be used: unreadable, not UTF-8, empty, malformed, or lacking a column.

    Nothing can be skipped past these, so they raise whatever `data.on_error` says.
    """


class DataValidationError(UserInputError):
    """One or more rows are bad. The message lists every one: row number, column, path and reason."""

    def __init__(self, message: str, problems: list | None = None):
        super().__init__(message)
        self.problems = list(problems or [])
