"""``blkio._core``: the names the core used to export from one module, kept
for code written against them.  The core now lives in modules by concern
(see docs/architecture.md): ``_memory``, ``_handle``, ``_pool``,
``_requests``, ``_device``."""

from ._device import _DeviceCore
from ._handle import LIBBLKIO_VERSION, State
from ._memory import Buffer, RangeAllocator
from ._pool import BouncePool
from ._requests import (OP_NAMES, REQ_FUA, REQ_NO_FALLBACK, REQ_NO_UNMAP, Completion, Op,
                        Queue)

__all__ = ["_DeviceCore", "LIBBLKIO_VERSION", "State", "Buffer", "RangeAllocator",
           "BouncePool", "OP_NAMES", "REQ_FUA", "REQ_NO_FALLBACK", "REQ_NO_UNMAP",
           "Completion", "Op", "Queue"]
