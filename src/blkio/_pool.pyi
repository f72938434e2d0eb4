# Type stubs for blkio._pool (see _pool.pyx).
import asyncio
import threading
from typing import Any, final

import numpy as np
import numpy.typing as npt

from ._handle import DeviceHandle

_U8Array = npt.NDArray[np.uint8]

class ThreadWaiter:
    event: threading.Event
    def __init__(self) -> None: ...
    def wake(self) -> None: ...
    def reset(self) -> None: ...

class AsyncWaiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None: ...
    def wake(self) -> None: ...
    def reset(self) -> None: ...

@final
class BounceSpace:
    def __new__(cls, handle: DeviceHandle, granule: int, initial: int,
                max_size: int) -> BounceSpace: ...

@final
class Arena:
    def __new__(cls, handle: DeviceHandle | None, granule: int, chunk_size: int) -> Arena: ...
    def alloc(self, nbytes: int) -> _U8Array: ...
