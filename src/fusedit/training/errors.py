"""Which exceptions are fusedit's own refusals of bad input (printed as one line by `python train.py`).

These carry a complete message naming the key, file, row or tensor at fault; a stack trace would only bury it.
Anything else (a bug, an out-of-memory error) keeps its full traceback.
"""

from __future__ import annotations


def user_error_types() -> tuple[type[BaseException], ...]:
    from fusedit.data.errors import DataValidationError, MetadataError
    from fusedit.training.checkpoint_checks import CheckpointError
    from fusedit.training.faults import NonFiniteTrainingError
    from fusedit.training.validate_config import ConfigError

    return ConfigError, MetadataError, DataValidationError, CheckpointError, NonFiniteTrainingError


def user_error_message(error: BaseException) -> str | None:
    """The message to print for a refusal, or None when `error` should keep its traceback."""
    if isinstance(error, user_error_types()):
        return str(error)
    if isinstance(error, FileNotFoundError) and str(error).startswith("ckpt_path="):
        return str(error)  # fusedit.training.checkpoint.resolve_checkpoint: a wrong resume path
    return None
