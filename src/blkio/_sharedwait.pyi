# Type stubs for blkio._sharedwait (see _sharedwait.pyx).
from typing import final

@final
class SharedWait: ...
