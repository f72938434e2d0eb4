# Type stubs for blkio._batch (see _batch.pyx).
from typing import final

@final
class BatchRing: ...

@final
class BatchArrays: ...
