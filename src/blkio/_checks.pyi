# Type stubs for blkio._checks (see _checks.pyx).
import enum
from typing import Any

import numpy as np
import numpy.typing as npt

LIBBLKIO_VERSION: str
OP_NAMES: tuple[str, ...]
REQ_FUA: int
REQ_NO_UNMAP: int
REQ_NO_FALLBACK: int

class Op(enum.IntEnum):
    READ = 0
    WRITE = 1
    WRITE_ZEROES = 2
    DISCARD = 3
    FLUSH = 4
    REPORT_ZONES = 5
    OPEN_ZONE = 6
    CLOSE_ZONE = 7
    FINISH_ZONE = 8
    RESET_ZONE = 9
    OPEN_ALL_ZONES = 10
    CLOSE_ALL_ZONES = 11
    FINISH_ALL_ZONES = 12
    RESET_ALL_ZONES = 13

def write_zeroes_flags(fua: bool = False, may_unmap: bool = True,
                       no_fallback: bool = False) -> int: ...
def int_array(obj: Any, name: str, signed: bool = False) -> npt.NDArray[np.uint64] | npt.NDArray[np.int64]: ...
