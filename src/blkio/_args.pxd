# Argument checks shared by every module of the core (inline: no module of
# its own).  Offsets, lengths and counts are integers >= 0 -- numpy integers
# too; a float or a bool is a TypeError and a negative value a ValueError,
# both naming the argument.  It may not touch libblkio or any device.

from libc.stdint cimport uint64_t, UINT64_MAX
from cpython.exc cimport PyErr_Occurred, PyErr_Clear


cdef extern from "Python.h":
    # Without Cython's exception check: as_u64 looks at PyErr_Occurred itself.
    unsigned long long _PyLong_AsU64 "PyLong_AsUnsignedLongLong"(object value)


cdef inline uint64_t _as_u64_slow(object value, str name) except? -1:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
    value = value.__index__()
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value > 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"{name} is too large: {value}")
    return <uint64_t>value


cdef inline uint64_t as_u64(object value, str name) except? -1:
    """``value`` as a uint64 byte count or offset, checked."""
    cdef uint64_t r
    if type(value) is int:
        r = _PyLong_AsU64(value)
        if r != UINT64_MAX or PyErr_Occurred() == NULL:
            return r
        PyErr_Clear()       # negative or too large: say which below
    return _as_u64_slow(value, name)


cdef inline Py_ssize_t as_index(object value, str name) except? -1:
    """An int argument (a count or an index): float and bool are TypeErrors."""
    if type(value) is not int:
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
        value = value.__index__()
    return value
