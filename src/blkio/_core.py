"""``blkio._core``: the names the core used to export from one module, kept
for code written against them.  The core now lives in modules by concern
(see docs/architecture.md)."""

from ._checks import LIBBLKIO_VERSION, OP_NAMES, REQ_FUA, REQ_NO_FALLBACK, REQ_NO_UNMAP, Op
from ._engine import Completion
from ._handle import State
from ._memory import Buffer, RangeAllocator
from ._public import BouncePool, Queue

__all__ = ["LIBBLKIO_VERSION", "State", "Buffer", "RangeAllocator", "BouncePool", "OP_NAMES",
           "REQ_FUA", "REQ_NO_FALLBACK", "REQ_NO_UNMAP", "Completion", "Op", "Queue"]
