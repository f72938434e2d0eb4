"""Exception types.  ``blkio.Error`` is an ``OSError`` carrying errno and
libblkio's message; for errnos that have a builtin ``OSError`` subclass the
raised error is also an instance of it (``FileNotFoundError`` for ENOENT, ...).
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Dict, Optional, Type

__all__ = ["Error", "ReadOnlyError", "error_for"]


class Error(OSError):
    """An error reported by libblkio: ``errno`` plus libblkio's message."""


class ReadOnlyError(Error, PermissionError):
    """A write, write-zeroes or discard on a read-only device."""


# OSError(errno, msg) picks FileNotFoundError & co. only for OSError itself;
# our subclass needs its own table, built once by multiple inheritance.
_BUILTIN: Dict[int, Type[OSError]] = {
    _errno.ENOENT: FileNotFoundError,
    _errno.EEXIST: FileExistsError,
    _errno.EACCES: PermissionError,
    _errno.EPERM: PermissionError,
    _errno.ENOTDIR: NotADirectoryError,
    _errno.EISDIR: IsADirectoryError,
    _errno.ETIMEDOUT: TimeoutError,
    _errno.ECONNREFUSED: ConnectionRefusedError,
    _errno.ECONNRESET: ConnectionResetError,
    _errno.EPIPE: BrokenPipeError,
    _errno.EINTR: InterruptedError,
    _errno.EAGAIN: BlockingIOError,
}
_SUBCLASSES: Dict[int, Type[Error]] = {
    code: type(f"{base.__name__}", (Error, base), {"__module__": "blkio", "__doc__": base.__doc__})
    for code, base in _BUILTIN.items()
}


def error_for(code: int, message: str, filename: Optional[str] = None) -> Error:
    """The ``Error`` for a positive errno ``code`` and a message."""
    cls = _SUBCLASSES.get(code, Error)
    reason = os.strerror(code)
    if not message:
        text = reason
    elif reason.lower() in message.lower():
        text = message          # libblkio's message already says it
    else:
        text = f"{message} ({reason})"
    if filename is not None:
        return cls(code, text, filename)
    return cls(code, text)
