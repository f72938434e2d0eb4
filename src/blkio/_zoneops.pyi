# Type stubs for blkio._zoneops (see _zoneops.pyx).
import enum

import numpy as np

class ZoneType(enum.IntEnum):
    CONVENTIONAL = 1
    SEQWRITE_REQ = 2
    SEQWRITE_PREF = 3

class ZoneState(enum.IntEnum):
    EMPTY = 1
    IMP_OPEN = 2
    EXP_OPEN = 3
    CLOSED = 4
    READONLY = 13
    FULL = 14
    OFFLINE = 15

ZONED_MODELS: tuple[str, str, str]
# struct blkio_zone as a numpy record (64 bytes).
ZONE_DTYPE: np.dtype[np.void]
