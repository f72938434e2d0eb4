# Type stubs for blkio._reconnect (see _reconnect.pyx).
from typing import final

@final
class Reconnector:
    @property
    def events_fd(self) -> int: ...
