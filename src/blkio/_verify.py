"""The verify block format of ``blkio bench --verify``: what a written block
holds, how it is filled and how a block read back is checked.

Every block starts with a 48-byte header (little-endian)::

    magic u64 | offset u64 | generation u64 | sequence u32 | length u32 |
    kind u16 | header_len u16 | reserved u32 | checksum u64

``generation`` is the writing run's random seed, ``sequence`` counts the
writes of that block in that run (a lost overwrite leaves the previous one),
``kind`` the verify kind.  The rest of the block is a pattern derived from
(generation, offset, sequence), so a torn write (part new, part old) or a
block at the wrong place never reads back as valid.  ``checksum`` covers the
whole block with the checksum field zeroed: CRC-32C (``crc32c``) or XXH64
(``xxh64``); with ``pattern`` it is 0 and the payload is compared with the
pattern instead (no checksum package needed; the first differing byte is
named).

Checksums come from ``google-crc32c`` and ``xxhash`` when they are installed
(``pip install 'blkio[verify]'``), else from the numpy versions here, which
give the same values, far more slowly.  This module knows nothing of devices,
queues or the bench's options.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

__all__ = ["KINDS", "HEADER", "HEADER_LEN", "MAGIC", "BlockFormat", "VerifyMismatch",
           "crc32c", "xxh64", "checksum_backend"]

KINDS = ("crc32c", "xxh64", "pattern")
_KIND_CODE = {"crc32c": 1, "xxh64": 2, "pattern": 3}
_KIND_NAME = {v: k for k, v in _KIND_CODE.items()}
MAGIC = int.from_bytes(b"blkioVF1", "little")
HEADER = np.dtype([("magic", "<u8"), ("offset", "<u8"), ("generation", "<u8"),
                   ("sequence", "<u4"), ("length", "<u4"), ("kind", "<u2"),
                   ("header_len", "<u2"), ("reserved", "<u4"), ("checksum", "<u8")])
HEADER_LEN = HEADER.itemsize            # 48
_CHECKSUM_AT = HEADER_LEN - 8                 # the checksum is the last field
MIN_BLOCK = 64                          # a header and some pattern

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)


# --------------------------------------------------------------------------
# numpy CRC-32C (Castagnoli, reflected 0x82F63B78, init and xorout ~0)
#
# CRC without its init and xorout is linear over GF(2): the CRC of a message
# is the XOR of what each byte contributes at its position.  A W-byte chunk
# is one gather from a [W, 256] table and an XOR reduction, vectorised over
# every chunk of every block; the chunks' CRCs are then combined pairwise
# (shift the left one by the right one's length: a linear map, applied as
# four byte-table lookups), log2(chunks) vectorised steps.

_POLY = 0x82F63B78
_W = 256


def _byte_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
    return t


_T8 = _byte_table()


def _zero_byte(c: np.ndarray) -> np.ndarray:
    """The CRC register after one more zero byte (linear in ``c``)."""
    return _T8[c & 0xFF] ^ (c >> np.uint32(8))


def _apply(tables: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A linear map on 32-bit values given by its four byte tables."""
    return (tables[0][x & 0xFF] ^ tables[1][(x >> 8) & 0xFF]
            ^ tables[2][(x >> 16) & 0xFF] ^ tables[3][x >> 24])


@functools.lru_cache(maxsize=None)
def _crc_tables() -> Tuple[np.ndarray, np.ndarray]:
    """(position tables [W, 256]: byte b at position j of a W-byte chunk;
    byte tables [4, 256] of the shift by W zero bytes)."""
    pos = np.empty((_W, 256), dtype=np.uint32)
    pos[_W - 1] = _T8
    for j in range(_W - 2, -1, -1):
        pos[j] = _zero_byte(pos[j + 1])
    basis = (np.arange(256, dtype=np.uint32)[None, :] << (8 * np.arange(4, dtype=np.uint32))[:, None])
    for _ in range(_W):
        basis = _zero_byte(basis)
    return pos, basis


@functools.lru_cache(maxsize=None)
def _shift_tables(level: int) -> np.ndarray:
    """Byte tables of the shift by ``W * 2**level`` zero bytes."""
    if level == 0:
        return _crc_tables()[1]
    half = _shift_tables(level - 1)
    basis = (np.arange(256, dtype=np.uint32)[None, :] << (8 * np.arange(4, dtype=np.uint32))[:, None])
    return _apply(half, _apply(half, basis))


@functools.lru_cache(maxsize=64)
def _zeros_crc(nbytes: int) -> int:
    """The register after ``nbytes`` zero bytes from the init value ~0."""
    c = np.array([0xFFFFFFFF], dtype=np.uint32)
    chunks, rest = divmod(nbytes, _W)
    level = 0
    while chunks:
        if chunks & 1:
            c = _apply(_shift_tables(level), c)
        chunks >>= 1
        level += 1
    for _ in range(rest):
        c = _zero_byte(c)
    return int(c[0])


def crc32c_numpy(blocks: np.ndarray) -> np.ndarray:
    """CRC-32C of each row of a uint8 [n, length] array -> uint32 [n]."""
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    n, length = blocks.shape
    pad = -length % _W
    if pad:          # leading zeros do not change the linear part
        blocks = np.concatenate([np.zeros((n, pad), np.uint8), blocks], axis=1)
    pos, _ = _crc_tables()
    chunks = blocks.reshape(n, -1, _W)
    part = np.bitwise_xor.reduce(pos[np.arange(_W), chunks], axis=-1)     # [n, chunks]
    if part.shape[1] == 0:
        part = np.zeros((n, 1), np.uint32)
    level = 0
    while part.shape[1] > 1:
        if part.shape[1] % 2:        # an odd count: a leading zero chunk
            part = np.concatenate([np.zeros((n, 1), np.uint32), part], axis=1)
        left, right = part[:, 0::2], part[:, 1::2]
        part = _apply(_shift_tables(level), left) ^ right
        level += 1
    return part[:, 0] ^ np.uint32(_zeros_crc(length) ^ 0xFFFFFFFF)


# --------------------------------------------------------------------------
# numpy XXH64 (seed 0), vectorised over blocks and over the four lanes

_P1 = _U64(11400714785074694791)
_P2 = _U64(14029467366897019727)
_P3 = _U64(1609587929392839161)
_P4 = _U64(9650029242287828579)
_P5 = _U64(2870177450012600261)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << _U64(r)) | (x >> _U64(64 - r))


def _round(acc: np.ndarray, inp: np.ndarray) -> np.ndarray:
    return _rotl(acc + inp * _P2, 31) * _P1


def xxh64_numpy(blocks: np.ndarray) -> np.ndarray:
    """XXH64 (seed 0) of each row of a uint8 [n, length] array -> uint64 [n]."""
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    n, length = blocks.shape
    stripes = length // 32
    with np.errstate(over="ignore"):
        if stripes:
            words = blocks[:, :stripes * 32].view("<u8").reshape(n, stripes, 4).astype(_U64)
            acc = np.empty((n, 4), dtype=_U64)
            acc[:] = np.array([int(_P1) + int(_P2) & (2**64 - 1), int(_P2), 0,
                               (2**64 - int(_P1)) & (2**64 - 1)], dtype=_U64)
            for s in range(stripes):
                acc = _round(acc, words[:, s])
            h = (_rotl(acc[:, 0], 1) + _rotl(acc[:, 1], 7) + _rotl(acc[:, 2], 12)
                 + _rotl(acc[:, 3], 18))
            for lane in range(4):
                h = (h ^ _round(np.zeros(n, _U64), acc[:, lane])) * _P1 + _P4
        else:
            h = np.full(n, _P5, dtype=_U64)
        h = h + _U64(length)
        at = stripes * 32
        while at + 8 <= length:
            k = blocks[:, at:at + 8].copy().view("<u8")[:, 0].astype(_U64)
            h = _rotl(h ^ _round(np.zeros(n, _U64), k), 27) * _P1 + _P4
            at += 8
        if at + 4 <= length:
            k32 = blocks[:, at:at + 4].copy().view("<u4")[:, 0].astype(_U64)
            h = _rotl(h ^ (k32 * _P1), 23) * _P2 + _P3
            at += 4
        while at < length:
            h = _rotl(h ^ (blocks[:, at].astype(_U64) * _P5), 11) * _P1
            at += 1
        h = (h ^ (h >> _U64(33))) * _P2
        h = (h ^ (h >> _U64(29))) * _P3
        return h ^ (h >> _U64(32))


# --------------------------------------------------------------------------
# the checksum functions: a package when installed, else numpy


def _package_crc32c() -> Optional[Callable[[Any], int]]:
    try:
        import google_crc32c
    except ImportError:
        return None
    if getattr(google_crc32c, "implementation", "c") != "c":
        return None           # its pure-Python fallback is slower than ours
    return google_crc32c.value


def _package_xxh64() -> Optional[Callable[[Any], int]]:
    try:
        import xxhash
    except ImportError:
        return None
    return xxhash.xxh64_intdigest


@functools.lru_cache(maxsize=None)
def checksum_backend(kind: str) -> Tuple[str, Optional[Callable[[Any], int]]]:
    """(what computes ``kind``'s checksum, its one-block function or None
    for the numpy version)."""
    if kind == "crc32c":
        fn = _package_crc32c()
        return ("google-crc32c" if fn else "numpy"), fn
    if kind == "xxh64":
        fn = _package_xxh64()
        return ("xxhash" if fn else "numpy"), fn
    return "none", None


def _checksums(kind: str, blocks: np.ndarray) -> np.ndarray:
    """The checksum of each row (uint64 [n])."""
    _, fn = checksum_backend(kind)
    if fn is not None:
        return np.fromiter((fn(row) for row in blocks), dtype=np.uint64, count=len(blocks))
    if kind == "crc32c":
        return crc32c_numpy(blocks).astype(np.uint64)
    return xxh64_numpy(blocks)


def crc32c(data: Any) -> int:
    """CRC-32C of a bytes-like object (the package's, or numpy's)."""
    row = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)[None, :]
    return int(_checksums("crc32c", row)[0])


def xxh64(data: Any) -> int:
    """XXH64 (seed 0) of a bytes-like object (the package's, or numpy's)."""
    row = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)[None, :]
    return int(_checksums("xxh64", row)[0])


# --------------------------------------------------------------------------
# blocks


class VerifyMismatch(Exception):
    """A block read back is not what was written: ``offset`` (bytes),
    ``reason``, and the ``expected`` and ``found`` header fields."""

    def __init__(self, offset: int, reason: str, expected: Dict[str, Any],
                 found: Dict[str, Any]) -> None:
        self.offset, self.reason, self.expected, self.found = offset, reason, expected, found
        super().__init__(self.describe())

    def describe(self) -> str:
        def fields(d: Dict[str, Any]) -> str:
            return " ".join(f"{k}={_show(k, v)}" for k, v in d.items())
        return (f"verify failed for the block at offset {self.offset}: {self.reason}\n"
                f"  expected: {fields(self.expected)}\n"
                f"  found:    {fields(self.found)}")


def _show(key: str, value: Any) -> str:
    if value is None:
        return "any"
    if key in ("magic", "checksum", "generation") and isinstance(value, int):
        return f"{value:#x}"
    return str(value)


class BlockFormat:
    """Fills blocks for writing and checks blocks read back, for one kind
    and block size; ``generation`` is the writing run's seed."""

    def __init__(self, kind: str, blocksize: int, generation: Optional[int] = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown verify kind {kind!r}; kinds are: {', '.join(KINDS)}")
        if blocksize < MIN_BLOCK:
            raise ValueError(f"verify needs blocks of at least {MIN_BLOCK} bytes, "
                             f"not {blocksize}")
        self.kind = kind
        self.code = _KIND_CODE[kind]
        self.bs = blocksize
        self.generation = (generation if generation is not None
                           else int.from_bytes(os.urandom(8), "little"))
        self.backend = checksum_backend(kind)[0]
        # the pattern's word count; a tail shorter than a word is zeroes
        self.words = (blocksize - HEADER_LEN) // 8
        self._index = np.arange(self.words, dtype=_U64) * _GOLDEN

    # -- the payload -------------------------------------------------------

    def _pattern(self, generations: np.ndarray, offsets: np.ndarray,
                 sequences: np.ndarray) -> np.ndarray:
        """uint64 [n, words]: the payload of blocks with these header fields."""
        with np.errstate(over="ignore"):
            seed = (generations.astype(_U64) ^ (offsets.astype(_U64) * _MIX1)
                    ^ (sequences.astype(_U64) * _MIX2))
            x = seed[:, None] + self._index[None, :]
            x = (x ^ (x >> _U64(30))) * _MIX1
            x = (x ^ (x >> _U64(27))) * _MIX2
            return x ^ (x >> _U64(31))

    def fill(self, rows: np.ndarray, offsets: np.ndarray, sequences: np.ndarray) -> None:
        """Make ``rows`` (uint8 [n, blocksize]) the blocks for ``offsets``
        (device bytes), written for the ``sequences``-th time."""
        n = len(rows)
        offsets = np.asarray(offsets, dtype=_U64)
        sequences = np.asarray(sequences, dtype=np.uint32)
        hdr = np.zeros(n, dtype=HEADER)
        hdr["magic"] = MAGIC
        hdr["offset"] = offsets
        hdr["generation"] = self.generation
        hdr["sequence"] = sequences
        hdr["length"] = self.bs
        hdr["kind"] = self.code
        hdr["header_len"] = HEADER_LEN
        rows[:, :HEADER_LEN] = hdr.view(np.uint8).reshape(n, HEADER_LEN)
        end = HEADER_LEN + 8 * self.words
        gens = np.full(n, self.generation, dtype=_U64)
        rows[:, HEADER_LEN:end] = self._pattern(gens, offsets, sequences).view(np.uint8)
        rows[:, end:] = 0
        if self.kind != "pattern":
            sums = _checksums(self.kind, rows)      # checksum field still 0
            rows[:, _CHECKSUM_AT:_CHECKSUM_AT + 8] = sums.astype("<u8").view(np.uint8).reshape(n, 8)

    # -- checking ----------------------------------------------------------

    def headers(self, rows: np.ndarray) -> np.ndarray:
        """The header of each row (a copy, structured HEADER [n])."""
        return np.ascontiguousarray(rows[:, :HEADER_LEN]).view(HEADER)[:, 0]

    def check(self, rows: np.ndarray, offsets: np.ndarray,
              generations: Optional[np.ndarray] = None,
              sequences: Optional[np.ndarray] = None) -> None:
        """Check blocks read back from ``offsets``; ``generations`` and
        ``sequences`` (when known: this run wrote them) must match too.
        Raises VerifyMismatch for the first bad block (lowest index)."""
        n = len(rows)
        if n == 0:
            return
        offsets = np.asarray(offsets, dtype=_U64)
        hdr = self.headers(rows)
        bad = ((hdr["magic"] != MAGIC) | (hdr["offset"] != offsets)
               | (hdr["length"] != self.bs) | (hdr["kind"] != self.code)
               | (hdr["header_len"] != HEADER_LEN) | (hdr["reserved"] != 0))
        if self.kind == "pattern":
            bad |= hdr["checksum"] != 0
        if generations is not None:
            bad |= hdr["generation"] != generations
        if sequences is not None:
            bad |= hdr["sequence"] != sequences
        first_bad = int(np.argmax(bad)) if bad.any() else n
        # the payload of the rows before the first bad header
        good = slice(0, first_bad)
        if self.kind == "pattern":
            end = HEADER_LEN + 8 * self.words
            want = self._pattern(hdr["generation"][good], offsets[good], hdr["sequence"][good])
            got = np.ascontiguousarray(rows[good, HEADER_LEN:end]).view(_U64)
            diff = (want != got).any(axis=1) | rows[good, end:].any(axis=1)
        else:
            stored = hdr["checksum"][good].copy()
            block = np.array(rows[good])                 # zero the field in a copy
            block[:, _CHECKSUM_AT:_CHECKSUM_AT + 8] = 0
            computed = _checksums(self.kind, block)
            diff = computed != stored
        if diff.any():
            first_bad = int(np.argmax(diff))
        if first_bad == n:
            return
        i = first_bad
        exp_gen = int(generations[i]) if generations is not None else None
        exp_seq = int(sequences[i]) if sequences is not None else None
        raise self._mismatch(rows[i], int(offsets[i]), hdr[i], exp_gen, exp_seq)

    def _mismatch(self, row: np.ndarray, offset: int, h: np.void, exp_gen: Optional[int],
                  exp_seq: Optional[int]) -> VerifyMismatch:
        found: Dict[str, Any] = {name: int(h[name]) for name in
                                 ("magic", "offset", "generation", "sequence", "length")}
        found["kind"] = _KIND_NAME.get(int(h["kind"]), int(h["kind"]))
        expected: Dict[str, Any] = {"magic": MAGIC, "offset": offset, "generation": exp_gen,
                                    "sequence": exp_seq, "length": self.bs, "kind": self.kind}
        reasons: List[str] = []
        if found["magic"] != MAGIC:
            reasons.append("no verify header (wrong magic: never written by a verify run, "
                           "or overwritten)")
        else:
            if found["offset"] != offset:
                reasons.append(f"the header says offset {found['offset']} "
                               "(a misplaced block)")
            if found["length"] != self.bs:
                reasons.append(f"the header says length {found['length']}")
            if found["kind"] != self.kind:
                reasons.append(f"written with --verify={found['kind']}")
            if exp_gen is not None and found["generation"] != exp_gen:
                reasons.append("another generation (a stale block: a write was lost)")
            elif exp_seq is not None and found["sequence"] != exp_seq:
                reasons.append(f"write {found['sequence']} of this block, expected write "
                               f"{exp_seq} (a lost or reordered write)")
            if int(h["header_len"]) != HEADER_LEN or int(h["reserved"]) or \
                    (self.kind == "pattern" and int(h["checksum"])):
                found["checksum"] = int(h["checksum"])
                expected["checksum"] = 0 if self.kind == "pattern" else None
                reasons.append("the header's header_len, reserved or checksum field changed")
        if not reasons:
            if self.kind != "pattern":
                block = np.array(row[None, :])
                block[:, _CHECKSUM_AT:_CHECKSUM_AT + 8] = 0
                expected["checksum"] = int(_checksums(self.kind, block)[0])
                found["checksum"] = int(h["checksum"])
                reasons.append(f"{self.kind} checksum mismatch")
            # The payload is the pattern in every kind: name the first byte
            # that differs from it.
            where = self._first_difference(row, offset, found["generation"], found["sequence"])
            if where is not None:
                expect, got = where[1], int(row[where[0]])
                reasons.append(f"byte {where[0]} of the block (device offset "
                               f"{offset + where[0]}) is {got:#04x}, the pattern has "
                               f"{expect:#04x}")
            elif self.kind != "pattern":
                reasons.append("the checksum field itself changed")
        return VerifyMismatch(offset, "; ".join(reasons), expected, found)

    def _first_difference(self, row: np.ndarray, offset: int, generation: int,
                          sequence: int) -> Optional[Tuple[int, int]]:
        """(index, expected byte) of the first payload byte that differs
        from the pattern of the block's header fields, or None."""
        end = HEADER_LEN + 8 * self.words
        expect = np.zeros(self.bs, dtype=np.uint8)
        expect[HEADER_LEN:end] = self._pattern(
            np.array([generation], _U64), np.array([offset], _U64),
            np.array([sequence], np.uint32)).view(np.uint8)[0]
        diff = np.flatnonzero(row[HEADER_LEN:] != expect[HEADER_LEN:])
        if not len(diff):
            return None
        at = int(diff[0]) + HEADER_LEN
        return at, int(expect[at])

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "generation": self.generation, "checksum": self.backend,
                "header_bytes": HEADER_LEN}
