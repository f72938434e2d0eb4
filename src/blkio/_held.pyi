# Type stubs for blkio._held (see _held.pyx).
from typing import Any, final

@final
class HeldBuffers:
    def __init__(self, *args: Any, **kwargs: Any) -> None: ...
