"""fusedit's refusals: one base class, and how the entry points print them.

A refusal carries a complete message naming the key, file, row or tensor at fault; a stack trace would only bury
it, so `python train.py`, `python infer.py` and `fusedit` print it as one line and exit with status 2. Anything
else (a bug, an out-of-memory error, a library's own ValueError) keeps its full traceback. The printer decides by
type alone: every refusal class derives from `Refusal`, wherever it is defined.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator


class Refusal(Exception):
    """fusedit refuses to go on; the message says what is wrong and, where it can, how to fix it."""

    def cli_message(self) -> str:
        """The message as a `fusedit` command prints it (where the fix is a flag rather than an argument)."""
        return str(self)


class UserInputError(Refusal, ValueError):
    """Bad input (a path, a CSV row, a config value) described well enough for the user to fix it."""


class UserFileNotFoundError(UserInputError, FileNotFoundError):
    """A path the user gave does not exist."""


class OutputExistsError(UserInputError, FileExistsError):
    """An output path already holds something the call would replace.

    The way to allow it depends on who called: the message names the Python argument (`overwrite=True`);
    `fusedit` commands print `cli_message()`, which names their `--overwrite` flag instead.
    """

    def __init__(self, path, reason: str = "exists") -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}; choose a new path or pass overwrite=True to replace it")

    def cli_message(self) -> str:
        return f"{self.path}: {self.reason}; choose a new path or pass --overwrite to replace it"


def examples(items: Iterable[object], limit: int = 5, *, sort: bool = True) -> str:
    """`a, b, c (and 7 more)`: the first `limit` of `items` (sorted unless `sort=False`), for a one-line refusal
    that names what is at fault without printing thousands of keys."""
    items = [str(item) for item in items]
    if sort:
        items.sort()
    return ", ".join(items[:limit]) + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def user_error_message(error: BaseException) -> str | None:
    """The message to print for a refusal, or None when `error` should keep its traceback."""
    return str(error) if isinstance(error, Refusal) else None


@contextlib.contextmanager
def refusals_as_one_line() -> Iterator[None]:
    """Print fusedit's refusals as `fusedit: error: ...` and exit 2; let every other exception through."""
    try:
        yield
    except Refusal as error:
        print(f"fusedit: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
