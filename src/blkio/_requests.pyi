# Type stubs for blkio._requests (see _requests.pyx).
import enum
from collections.abc import Iterable
from typing import Any, SupportsIndex, final

import numpy as np
import numpy.typing as npt
from _typeshed import ReadableBuffer, WriteableBuffer

# Anything with the buffer protocol (bytes, bytearray, memoryview, mmap,
# array.array, Buffer, numpy arrays); writable where the device writes into
# it.  numpy declares ndarray.__buffer__ only for Python >= 3.12, hence the
# explicit ndarray.
_BufferLike = ReadableBuffer | np.ndarray[Any, Any]
_WritableBufferLike = WriteableBuffer | np.ndarray[Any, Any]
_U8Array = npt.NDArray[np.uint8]

OP_NAMES: tuple[str, ...]
REQ_FUA: int
REQ_NO_UNMAP: int
REQ_NO_FALLBACK: int
kept_for_the_kernel: list[Any]

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

def write_zeroes_flags(fua: bool = False, may_unmap: bool = True,
                       no_fallback: bool = False) -> int: ...

@final
class HeldBuffers: ...

@final
class Completion:
    @property
    def user_data(self) -> Any: ...
    @property
    def ret(self) -> int: ...
    @property
    def error_msg(self) -> str | None: ...
    @property
    def op(self) -> str: ...
    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...
    def check(self) -> int: ...

@final
class Queue:
    # Single requests: enqueue only (submit()/wait()/completions() send
    # them); each returns the request's length in bytes.
    def enqueue(self, op: SupportsIndex, offset: SupportsIndex = 0, buf: Any = None,
                length: SupportsIndex = 0, flags: int = 0, user_data: Any = None,
                vectored: bool = False, bounce: _U8Array | None = None,
                nowait: bool = False) -> int: ...
    def read(self, offset: SupportsIndex, buf: _WritableBufferLike, *,
             user_data: Any = None) -> int: ...
    def write(self, offset: SupportsIndex, buf: _BufferLike, *, user_data: Any = None,
              fua: bool = False) -> int: ...
    def readv(self, offset: SupportsIndex, bufs: Iterable[_WritableBufferLike], *,
              user_data: Any = None) -> int: ...
    def writev(self, offset: SupportsIndex, bufs: Iterable[_BufferLike], *,
               user_data: Any = None, fua: bool = False) -> int: ...
    def write_zeroes(self, offset: SupportsIndex, length: SupportsIndex, *,
                     user_data: Any = None, fua: bool = False, may_unmap: bool = True,
                     no_fallback: bool = False) -> int: ...
    def discard(self, offset: SupportsIndex, length: SupportsIndex, *,
                user_data: Any = None) -> int: ...
    def flush(self, *, user_data: Any = None) -> int: ...
    # Zone requests (zoned devices): enqueue only; a report's completion
    # ret is the number of zones filled in.  Offsets in bytes.
    def enqueue_zone(self, op: SupportsIndex, offset: SupportsIndex = 0, zones: Any = None, *,
                     user_data: Any = None, bounce: _U8Array | None = None,
                     nowait: bool = False) -> int: ...
    def report_zones(self, offset: SupportsIndex, zones: _WritableBufferLike, *,
                     user_data: Any = None) -> int: ...
    def open_zone(self, offset: SupportsIndex, *, user_data: Any = None) -> int: ...
    def close_zone(self, offset: SupportsIndex, *, user_data: Any = None) -> int: ...
    def finish_zone(self, offset: SupportsIndex, *, user_data: Any = None) -> int: ...
    def reset_zone(self, offset: SupportsIndex, *, user_data: Any = None) -> int: ...
    def open_all_zones(self, *, user_data: Any = None) -> int: ...
    def close_all_zones(self, *, user_data: Any = None) -> int: ...
    def finish_all_zones(self, *, user_data: Any = None) -> int: ...
    def reset_all_zones(self, *, user_data: Any = None) -> int: ...
    def submit(self) -> None: ...
    def wait(self, min: SupportsIndex = 1, max: SupportsIndex | None = None,
             timeout: float | None = None) -> list[Completion]: ...
    def completions(self, max: SupportsIndex | None = None) -> list[Completion]: ...
    def poll(self, max: SupportsIndex | None = None) -> list[Completion]: ...
    # Batch path: offsets uint64[n], buffers uint8[n, blocksize] of mapped
    # memory, tags int64[n]; out has fields user_data (int64) and ret (int32).
    def submit_reads(self, offsets: npt.NDArray[np.uint64],
                     buffers: _U8Array | npt.NDArray[np.uint64], *,
                     user_data: npt.NDArray[np.int64] | None = None,
                     region: _U8Array | None = None, blocksize: int = 0) -> int: ...
    def submit_writes(self, offsets: npt.NDArray[np.uint64],
                      buffers: _U8Array | npt.NDArray[np.uint64], *,
                      fua: bool = False, user_data: npt.NDArray[np.int64] | None = None,
                      region: _U8Array | None = None, blocksize: int = 0) -> int: ...
    def reap(self, out: npt.NDArray[np.void], min: SupportsIndex = 0,
             timeout: float | None = None) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def batch_ready(self) -> int: ...
    @property
    def completion_fd(self) -> int: ...
    @property
    def completion_fd_enabled(self) -> bool: ...
    @completion_fd_enabled.setter
    def completion_fd_enabled(self, value: bool) -> None: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def requests(self) -> int: ...
    @property
    def removed(self) -> bool: ...
    @property
    def device(self) -> Any: ...
    @property
    def index(self) -> int: ...
    @property
    def is_poll_queue(self) -> bool: ...
    @property
    def slots(self) -> int: ...
    def _drive_slice(self, seconds: float) -> bool: ...
