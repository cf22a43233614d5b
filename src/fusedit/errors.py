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


# fusedit's other refusal classes, by defining module. An exception of a class exists only once its module was
# imported, so they are looked up in sys.modules: printing a config error must not import Lightning or torch first
# (`python train.py lora.rank=0` answers before either is loaded).
_REFUSALS = {
    "fusedit.data.errors": ("MetadataError", "DataValidationError"),
    "fusedit.training.checkpoint_checks": ("CheckpointError",),
    "fusedit.training.faults": ("NonFiniteTrainingError",),
}


def user_error_types() -> tuple[type[BaseException], ...]:
    """The refusal classes among the modules imported so far (UserInputError always)."""
    types: list[type[BaseException]] = [UserInputError]
    for module_name, names in _REFUSALS.items():
        module = sys.modules.get(module_name)
        if module is not None:
            types.extend(getattr(module, name) for name in names)
    return tuple(types)


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
