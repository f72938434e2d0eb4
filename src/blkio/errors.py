"""Exception types.  ``blkio.Error`` is an ``OSError`` carrying errno and
libblkio's message; for errnos that have a builtin ``OSError`` subclass the
raised error is also an instance of it: ``blkio.errors.FileNotFoundError``
(ENOENT) is both a ``blkio.Error`` and a ``FileNotFoundError``, and so on for
every class in ``ERRNO_CLASSES``.

Every class here is importable by the name it pickles under, and an error
round-trips through pickle with its class, errno and message (so it can
cross a ``ProcessPoolExecutor``).
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Dict, Optional, Type

__all__ = ["Error", "ReadOnlyError", "ERRNO_CLASSES", "error_for"]


class Error(OSError):
    """An error reported by libblkio: ``errno`` plus libblkio's message."""

    __module__ = "blkio"


class ReadOnlyError(Error, PermissionError):
    """A write, write-zeroes or discard on a read-only device."""

    __module__ = "blkio"


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


def _errno_class(base: Type[OSError]) -> Type[Error]:
    # Named as the builtin and a global of this module, so pickle finds it
    # as blkio.errors.<name>.
    cls = type(base.__name__, (Error, base),
               {"__module__": __name__, "__qualname__": base.__name__,
                "__doc__": f"A blkio.Error that is also a {base.__name__}."})
    globals()[base.__name__] = cls
    return cls


_CLASS_BY_BASE: Dict[Type[OSError], Type[Error]] = {}
for _base in _BUILTIN.values():
    if _base not in _CLASS_BY_BASE:
        _CLASS_BY_BASE[_base] = _errno_class(_base)

#: errno -> the ``blkio.Error`` subclass raised for it.
ERRNO_CLASSES: Dict[int, Type[Error]] = {code: _CLASS_BY_BASE[base]
                                         for code, base in _BUILTIN.items()}
__all__ += sorted(cls.__name__ for cls in _CLASS_BY_BASE.values())


def error_for(code: int, message: str, filename: Optional[str] = None) -> Error:
    """The ``Error`` for a positive errno ``code`` and a message."""
    if isinstance(code, bool) or not isinstance(code, int):
        raise TypeError(f"an errno is an int, not {type(code).__name__}")
    if not 0 < code < 4096:
        raise ValueError(f"{code} is not an errno")
    if not isinstance(message, str):
        raise TypeError(f"message must be a str, not {type(message).__name__}")
    cls = ERRNO_CLASSES.get(code, Error)
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
