"""Zoned devices, the core's part: the zone types and states of a report,
the zoned models, and a reported zone's record layout (``ZONE_DTYPE``, the
numpy form of libblkio's ``struct blkio_zone``).  The checks made before a
zone request are ``_checks.zone_problem``; the requests go through the queue
engine like any other.  Nothing here calls libblkio.
"""

import enum

import numpy as np

from . cimport _libblkio as lb


class ZoneType(enum.IntEnum):
    """``type`` of a reported zone (blkio.h's BLKIO_ZONE_TYPE_*)."""

    CONVENTIONAL = lb.BLKIO_ZONE_TYPE_CONVENTIONAL
    SEQWRITE_REQ = lb.BLKIO_ZONE_TYPE_SEQWRITE_REQ
    SEQWRITE_PREF = lb.BLKIO_ZONE_TYPE_SEQWRITE_PREF

    def __str__(self) -> str:
        return self.name.lower()


class ZoneState(enum.IntEnum):
    """``state`` of a reported zone (blkio.h's BLKIO_ZONE_STATE_*)."""

    EMPTY = lb.BLKIO_ZONE_STATE_EMPTY
    IMP_OPEN = lb.BLKIO_ZONE_STATE_IMP_OPEN
    EXP_OPEN = lb.BLKIO_ZONE_STATE_EXP_OPEN
    CLOSED = lb.BLKIO_ZONE_STATE_CLOSED
    READONLY = lb.BLKIO_ZONE_STATE_READONLY
    FULL = lb.BLKIO_ZONE_STATE_FULL
    OFFLINE = lb.BLKIO_ZONE_STATE_OFFLINE

    def __str__(self) -> str:
        return self.name.lower()


#: Zoned models by the value of libblkio's ``zoned`` property.
ZONED_MODELS = ("none", "host-aware", "host-managed")

cdef lb.blkio_zone _zone_layout

#: One reported zone: libblkio's struct blkio_zone as a numpy record.
#: start, len, capacity and write_pointer are bytes; type is a ZoneType,
#: state a ZoneState; reset says a reset is recommended.
ZONE_DTYPE = np.dtype({
    "names": ["start", "len", "capacity", "write_pointer", "type", "state", "reset"],
    "formats": [np.uint64, np.uint64, np.uint64, np.uint64, np.uint8, np.uint8, np.bool_],
    "offsets": [<char *>&_zone_layout.start - <char *>&_zone_layout,
                <char *>&_zone_layout.len - <char *>&_zone_layout,
                <char *>&_zone_layout.capacity - <char *>&_zone_layout,
                <char *>&_zone_layout.write_pointer - <char *>&_zone_layout,
                <char *>&_zone_layout.zone_type - <char *>&_zone_layout,
                <char *>&_zone_layout.zone_state - <char *>&_zone_layout,
                <char *>&_zone_layout.reset - <char *>&_zone_layout],
    "itemsize": sizeof(lb.blkio_zone),
})
