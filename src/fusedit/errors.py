"""Which exceptions are fusedit's own refusals of bad input, and how the entry points print them.

A refusal carries a complete message naming the key, file, row or tensor at fault; a stack trace would only bury
it, so `python train.py` / `python infer.py` print it as one line and exit with status 2. Anything else (a bug, an
out-of-memory error) keeps its full traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class UserInputError(ValueError):
    """Bad input (a path, a CSV row, a config value) described well enough for the user to fix it."""


class UserFileNotFoundError(UserInputError, FileNotFoundError):
    """A path the user gave does not exist."""


def user_error_types() -> tuple[type[BaseException], ...]:
    from fusedit.data.errors import DataValidationError, MetadataError
    from fusedit.training.checkpoint_checks import CheckpointError
    from fusedit.training.faults import NonFiniteTrainingError
    from fusedit.training.validate_config import ConfigError

    return UserInputError, ConfigError, MetadataError, DataValidationError, CheckpointError, NonFiniteTrainingError


def user_error_message(error: BaseException) -> str | None:
    """The message to print for a refusal, or None when `error` should keep its traceback."""
    if isinstance(error, user_error_types()):
        return str(error)
    if isinstance(error, FileNotFoundError) and str(error).startswith("ckpt_path="):
        return str(error)  # fusedit.training.checkpoint.resolve_checkpoint: a wrong resume path
    return None


@contextlib.contextmanager
def refusals_as_one_line() -> Iterator[None]:
    """Print fusedit's refusals as `fusedit: error: ...` and exit 2; let every other exception through."""
    try:
        yield
    except Exception as error:
        message = user_error_message(error)
        if message is None:
            raise
        print(f"fusedit: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
