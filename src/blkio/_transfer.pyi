# Type stubs for blkio._transfer (see _transfer.pyx).
from typing import final

OP_NAMES: tuple[str, ...]

@final
class Transfer: ...
