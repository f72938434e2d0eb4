"""Checks and errors: the bottom of the core.

It owns the request kinds (``Op``, ``OP_NAMES``) and flags, the problems a
request can have (``Problem``) with their one message each
(``problem_error``), the words for a device or queue that cannot take a call
(closed, forked, not started, removed, the backend hung up, cancelled), the
argument checks every entry point runs (``as_u64``, ``as_index`` in the
``.pxd``; ``int_array`` for the integer arrays of a batch) and the
conversion of libblkio's errors (``libblkio_error``, ``request_error``).
Every message of these kinds is written here once.  It touches no device:
callers pass the limits (``HotLimits``) and names the message needs.
"""

import os

import numpy as np

from . cimport _libblkio as lb
from .errors import Error, ReadOnlyError, error_for

cdef extern from *:
    """
    #ifndef BLKIO_PY_LIBBLKIO_VERSION
    #define BLKIO_PY_LIBBLKIO_VERSION "unknown"
    #endif
    """
    const char *BLKIO_PY_LIBBLKIO_VERSION

#: libblkio version this extension was built against (from pkg-config).
LIBBLKIO_VERSION = BLKIO_PY_LIBBLKIO_VERSION.decode()

#: Request names, by op code.
OP_NAMES = ("read", "write", "write_zeroes", "discard", "flush", "report_zones", "open_zone",
            "close_zone", "finish_zone", "reset_zone", "open_all_zones", "close_all_zones",
            "finish_all_zones", "reset_all_zones")

#: Request flags (libblkio's BLKIO_REQ_*).
REQ_FUA = lb.BLKIO_REQ_FUA
REQ_NO_UNMAP = lb.BLKIO_REQ_NO_UNMAP
REQ_NO_FALLBACK = lb.BLKIO_REQ_NO_FALLBACK

cdef str BACKEND_HUNG_UP = "the backend hung up"
cdef str CANCELLED = "the device was closed (or the queue removed) before it completed"


# ---- requests -----------------------------------------------------------------

cdef int request_problem(HotLimits *lim, int op, uint64_t offset, uint64_t length) noexcept nogil:
    """The first problem of one request of kind ``op`` (NO_PROBLEM: none)."""
    if op != READ and op != FLUSH and lim.read_only:
        return READ_ONLY
    if op == FLUSH:
        return NO_PROBLEM
    cdef int problem = range_problem(lim, offset, length)
    if problem:
        return problem
    if (op == WRITE or op == WRITE_ZEROES) and lim.zoned == 2 and length:
        # A write to a host-managed device stays inside one zone.  (That it
        # starts at the write pointer needs a report: the device checks it.)
        if length > lim.zone_size - offset % lim.zone_size:
            return CROSSES_ZONE
    return NO_PROBLEM


cdef int zone_problem(HotLimits *lim, int op, uint64_t offset) noexcept nogil:
    """What blkio can check before a zone request (the device answers only
    EIO, or ENOTSUP for a zone start it does not like)."""
    if not lim.zoned:
        return NOT_ZONED
    if op != REPORT_ZONES and lim.read_only:
        return READ_ONLY
    if op >= OPEN_ALL_ZONES:
        return NO_PROBLEM
    if offset >= lim.capacity:
        return NOT_IN_DEVICE
    if op != REPORT_ZONES and offset % lim.zone_size:
        return NOT_ZONE_START
    return NO_PROBLEM


# The message of each problem, written once.  Fields: name (the request),
# at ("offset N", or "offsets[i] = N" in a batch), where, offset, length,
# driver, the limits (alignment, capacity, max_transfer, buf_alignment,
# zone_size, nr_zones), end (the zone boundary), zone_start.
_MESSAGES = {
    MISALIGNED: "{name}: {at} and length {length} must be multiples of request-alignment "
                "({alignment}) on {driver}",
    PAST_END: "{name}: {length} bytes at {at} pass the end of the device (capacity {capacity})",
    TOO_LONG: "{name} of {length} bytes exceeds max-transfer ({max_transfer}); split it, or "
              "use the Device's blocking methods, which split",
    READ_ONLY: "{name} refused: device is read-only ({driver})",
    CROSSES_ZONE: "{name} of {length} bytes at {at} crosses the zone boundary at {end} (zone "
                  "size {zone_size} bytes): writes to a host-managed zoned device must stay "
                  "inside one zone (split them there, or use Device.zone_writer)",
    NOT_ZONED: "{name}: the {driver} device is not zoned (zoned model 'none'); zone requests "
               "need a zoned device, such as an NVMe ZNS namespace on nvme-io_uring",
    NOT_IN_DEVICE: "{name}: {at} is not inside the device (capacity {capacity}: {nr_zones} "
                   "zones of {zone_size} bytes)",
    NOT_ZONE_START: "{name}: {at} is not the start of a zone (zone size {zone_size} bytes; the "
                    "zone holding it starts at {zone_start})",
    BUF_PAST_REGION: "{where} = {offset} + {length} passes the end of region",
    BUF_MISALIGNED: "{where} = {offset} is not aligned to buf-alignment ({buf_alignment})",
}


cdef object problem_error(int problem, str driver, HotLimits *lim, int op, uint64_t offset,
                          uint64_t length, str where=None):
    """The exception for ``problem`` of a request (``where``: which one of a
    batch, e.g. "offsets[3]")."""
    cdef uint64_t zs = lim.zone_size or 1
    text = _MESSAGES.get(problem, "{name}: problem {problem}").format(
        name=OP_NAMES[op] if op_in(op, READ, RESET_ALL_ZONES) else "request",
        at=f"{where} = {offset}" if where else f"offset {offset}", where=where,
        offset=offset, length=length, driver=driver, problem=problem,
        alignment=lim.request_alignment, capacity=lim.capacity, max_transfer=lim.max_transfer,
        buf_alignment=lim.buf_alignment, zone_size=lim.zone_size, nr_zones=lim.nr_zones,
        end=offset - offset % zs + zs, zone_start=offset - offset % zs)
    if problem == READ_ONLY:
        return ReadOnlyError(9, text)
    return ValueError(text)


cdef int check_request(str driver, HotLimits *lim, int op, uint64_t offset,
                       uint64_t length) except -1:
    """Raise the error of one request's problem, if it has one."""
    cdef int problem = request_problem(lim, op, offset, length)
    if problem:
        raise problem_error(problem, driver, lim, op, offset, length)
    return 0


# ---- devices and queues that cannot take a call ----------------------------

cdef object closed_error(str driver):
    return ValueError(f"{driver or 'blkio'} device is closed")


cdef object forked_error(str driver, int pid):
    return ValueError(f"this {driver} device was opened in process {pid}, before a fork(); "
                      f"this is process {os.getpid()}: open the device again in this process "
                      f"(the parent's is left untouched)")


cdef object not_started_error(str driver, str state):
    return ValueError(f"{driver} device is {state}, not started")


cdef object removed_error(int index):
    return ValueError(f"queue {index} was removed")


cdef object no_device_error():
    return ValueError("this blkio object belongs to no device (make queues with "
                      "Device.queue(), devices with blkio.open())")


cdef object broken_error(str driver, Py_ssize_t in_flight, str why=None):
    """EIO for a device whose backend is gone: ``why`` it is gone for good
    (a reconnect that failed), else that it hung up."""
    if why is None:
        why = BACKEND_HUNG_UP
    if in_flight < 0:
        return Error(5, f"{driver}: {why}; close the device")
    return Error(5, f"{driver}: {why} with {in_flight} request(s) in flight")


cdef str reconnect_failed(object timeout, object cause, bint timed_out):
    """Why a device that reconnects gave up: no backend answered in time
    (``cause``: the last attempt's error), or the one that answered is not
    the same device (``cause`` says what differs)."""
    if not timed_out:
        return f"{BACKEND_HUNG_UP}, and the backend that answered the reconnect differs ({cause})"
    if timeout is None:
        return f"{BACKEND_HUNG_UP} and could not be reconnected ({cause})"
    return (f"{BACKEND_HUNG_UP} and did not come back within reconnect_timeout={timeout:g} s "
            f"(last attempt: {cause})")


# ---- libblkio's errors ---------------------------------------------------------

cdef object libblkio_error(int ret, str what, object filename=None):
    """The exception for a failed instance call, with libblkio's message
    for this thread (read at once: the next call replaces it)."""
    cdef const char *msg = lb.blkio_get_error_msg()
    text = what
    if msg != NULL and msg[0] != 0:
        text = f"{what}: {msg.decode('utf-8', 'replace')}"
    return error_for(-ret, text, filename)


cdef object request_error(int ret, object msg, str what, bint read_only):
    """The OSError for a failed request (ret is a negative errno)."""
    code = -ret
    if code == 9 and read_only:         # EBADF
        return ReadOnlyError(9, f"{what} failed: device is read-only")
    text = f"{what} failed" + (f": {msg}" if msg else "")
    return error_for(code, text)


cdef void unraisable(object where, object exc=None) noexcept:
    """Report an exception that cannot propagate (as Python does for
    __del__): ``exc``, or the one being handled."""
    try:
        import sys
        import traceback
        print(f"Exception ignored in {where!r}:", file=sys.stderr)
        if exc is None:
            traceback.print_exc()
        else:
            traceback.print_exception(type(exc), exc, exc.__traceback__)
    except BaseException:
        pass


def write_zeroes_flags(bint fua=False, bint may_unmap=True, bint no_fallback=False):
    """The request flags of a write-zeroes request."""
    return zero_flags(fua, may_unmap, no_fallback)


cdef unsigned int zero_flags(bint fua, bint may_unmap, bint no_fallback) except? 0xFFFFFFFF:
    cdef unsigned int flags = 0
    if fua:
        # FUA on write-zeroes reaches the device only from libblkio 1.4.0 on
        if LIBBLKIO_VERSION != "unknown" and \
                tuple(int(x) for x in LIBBLKIO_VERSION.split(".")[:2]) < (1, 4):
            raise ValueError("fua=True on write_zeroes needs libblkio >= 1.4.0 "
                             f"(built against {LIBBLKIO_VERSION})")
        flags |= lb.BLKIO_REQ_FUA
    if not may_unmap:
        flags |= lb.BLKIO_REQ_NO_UNMAP
    if no_fallback:
        flags |= lb.BLKIO_REQ_NO_FALLBACK
    return flags


# ---- arguments --------------------------------------------------------------------

cdef uint64_t as_u64_slow(object value, str name) except? 0xFFFFFFFFFFFFFFFF:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
    value = value.__index__()
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value > 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"{name} is too large: {value}")
    return <uint64_t>value


cdef Py_ssize_t as_index_slow(object value, str name) except? -1:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
    value = value.__index__()
    if not -(1 << 62) <= value < (1 << 62):
        raise ValueError(f"{name} is out of range: {value}")
    return value


def int_array(obj, str name, bint signed=False):
    """``obj`` as a 1-D C-contiguous numpy array of uint64 (or, ``signed``,
    int64): the one check of the integer arrays a batch takes (offsets,
    tags).  Any integer array, buffer or sequence of ints is accepted;
    floats, bools and anything else are a TypeError, a value out of range a
    ValueError naming its index."""
    dtype = np.int64 if signed else np.uint64
    if isinstance(obj, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of integers, not {type(obj).__name__}")
    if isinstance(obj, np.ndarray):
        a = obj
    else:
        try:
            memoryview(obj).release()
        except TypeError:
            # A sequence: each element is checked (numpy would read
            # [True, 4096] as 1, 4096, and [2**64-1, 0] as floats).
            try:
                a = np.asarray(obj, dtype=object)
            except (TypeError, ValueError):
                raise TypeError(f"{name} must be a sequence of integers, not "
                                f"{type(obj).__name__}") from None
        else:
            a = np.asarray(obj)                 # a buffer: its own dtype
    if a.ndim == 0:
        raise TypeError(f"{name} must be an array or sequence of integers, not "
                        f"{type(obj).__name__}")
    if a.ndim != 1:
        raise TypeError(f"{name} must be 1-D, not of shape {a.shape}")
    if a.size == 0:
        return np.empty(0, dtype)
    kind = a.dtype.kind
    if kind == "O":
        out = np.empty(a.size, dtype)
        for i in range(a.size):
            v = a[i]
            if isinstance(v, (bool, np.bool_)) or not hasattr(v, "__index__"):
                raise TypeError(f"{name}[{i}] must be an integer, not {type(v).__name__}")
            v = v.__index__()
            if v < 0 and not signed:
                raise ValueError(f"{name}[{i}] = {v} must be >= 0")
            if not (-(1 << 63) <= v < (1 << 63) if signed else v < (1 << 64)):
                raise ValueError(f"{name}[{i}] = {v} is out of range for {np.dtype(dtype).name}")
            out[i] = v
        return out
    if kind not in "iu":
        raise TypeError(f"{name} must hold integers, not {a.dtype} "
                        f"(a float or bool offset would be truncated or misread)")
    if kind == "i" and not signed:
        neg = np.flatnonzero(a < 0)
        if neg.size:
            i = int(neg[0])
            raise ValueError(f"{name}[{i}] = {int(a[i])} must be >= 0")
    if kind == "u" and signed and a.dtype.itemsize == 8:
        big = np.flatnonzero(a > np.uint64((1 << 63) - 1))
        if big.size:
            i = int(big[0])
            raise ValueError(f"{name}[{i}] = {int(a[i])} is out of range for int64")
    return np.ascontiguousarray(a, dtype=dtype)
