"""Only regular files are opened: a FIFO blocks `open()` until a writer appears, `/dev/zero` never ends.

Every path a user hands fusedit to read (a metadata file, an image, a file to hash) is checked here first, with
`os.stat` (which follows symlinks, so a link to `/dev/zero` is seen as the character device it is). Neither check
opens the file, so neither can hang. Light on purpose (no torch): inference's preflight uses it at start-up.
"""

from __future__ import annotations

import os
import stat


def file_kind(mode: int) -> str:
    """What a `st_mode` describes, in words ("a FIFO (named pipe)", "a character device", ...)."""
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def not_regular_reason(path: str | os.PathLike) -> str | None:
    """None when `path` is a regular file (after symlinks); else a short reason: "file not found", "is a FIFO ...".

    Permission problems are left to the reader that opens the file (its error names them).
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "file not found"
    except NotADirectoryError:
        return "file not found (a parent in the path is not a directory)"
    except OSError as error:
        return f"cannot read file ({error.strerror})"
    if stat.S_ISREG(mode):
        return None
    return f"is {file_kind(mode)}, not a regular file"
