"""``python -m blkio copy``: libblkio's blkio-copy, pipelined.

This module owns the copy command: its command line (the ``--input-*`` /
``--output-*`` syntax of libblkio's example program, plus our options), how
the two ends are opened (devices with ``blkio.open``, plain files through the
io_uring driver, buffered or O_DIRECT by what the page cache holds), the
pipeline (a ring of aligned slots in one ``blkio.Buffer`` mapped into both
devices, reads and writes in flight on both at once), the kernel copy of a
regular file to a regular file (``copy_file_range``), ``--sparse``,
``--verify``, the final flush, progress, the JSON summary and Ctrl-C.  It
uses only blkio's public API.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import gc
import os
import signal
import stat
import sys
import time
from collections import deque
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

import numpy as np

import blkio

from ._cliparse import (CONNECT_TIMEOUT_HELP, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE,
                        RECONNECT_HELP, RECONNECT_TIMEOUT_HELP, SuggestingParser,
                        connect_timeout_type, int_type, open_failure, program_name,
                        seconds_type)
from ._cliprops import PropertyError, check_driver, check_properties, parse_properties
from ._drivers import DRIVER_FACTS
from ._memory import resident_pages
from ._sizes import format_bytes as _fmt_bytes, size_type

PROG = "blkio copy"
MiB = 1 << 20
DEFAULT_BLOCKSIZE = 1 * MiB       # as dd bs=1M (2 and 4 MiB copied no faster: bench history)
# Chunks in flight: 32 copied O_DIRECT files faster than qemu-img's 8 (the
# rounds are in docs/bench-history.md); 32 MiB at the default blocksize.
DEFAULT_DEPTH = 32
# Bytes per copy_file_range call of the kernel copy: a progress step, and
# how far Ctrl-C may lag.
KERNEL_CHUNK = 8 * MiB
# The kernel copy of an input in the page cache asks the kernel to start
# writing back what it has copied every this many bytes, so the final flush
# finds most of it on the disk.
WRITEBACK_STEP = 8 * MiB
# Pages of an input file looked at to tell whether it is in the page cache,
# and the share of them that must be there for buffered reads.
CACHE_PROBES = 64
CACHED_ENOUGH = 0.5

USAGE = """\
{prog} --input-blkio=DRIVER PROPERTY=VALUE ... | --input-file=PATH
       --output-blkio=DRIVER PROPERTY=VALUE ... | --output-file=PATH
       [--blocksize=BYTES] [--depth=N] [--sparse] [--verify] [--json]
       [--progress=auto|bar|lines|none] [--progress-interval=SECONDS]
       [--file-direct=auto|on|off] [--offload=auto|off]"""

DESCRIPTION = """\
Copy a libblkio device or a file to another, with several reads and writes in
flight through memory mapped into both devices (libblkio's blkio-copy, which
copies 128 KiB at a time, one request at a time).  The input's whole size is
copied to the start of the output.  Properties follow the --input-blkio or
--output-blkio they belong to, as libblkio spells them (path=/dev/sdb
direct=1 num-entries=256).  --input-file/--output-file open a regular file or
block device through the io_uring driver (--file-direct: an input file whose
data is mostly in the page cache is read from there, others with O_DIRECT
where the file system allows it); a missing output file is created and a
shorter one extended to the input's size (never truncated).  A regular file
copied to a regular file on the same file system is copied by the kernel
(copy_file_range: no libblkio device does that I/O; --offload=off for the
libblkio pipeline).  A file input whose size is
not a multiple of the output device's block size is padded with zeroes on the
device.  Progress goes to stderr (a bar or lines, --progress) and, at the end,
one summary line: bytes, seconds and the rate, the final flush included (the
bar shows the same average rate).  Sizes take K, M, G (binary: 1M is 1 MiB;
KiB, MiB also work).  Exit status: 0 copied, 1 I/O error, device missing or
verify mismatch, 2 bad command line or spec (nothing written), 130
interrupted (Ctrl-C)."""


class SpecError(Exception):
    """A bad command line or device spec: one line on stderr, exit status 2,
    nothing written."""


class Interrupted(Exception):
    """The copy stopped on Ctrl-C (after waiting for what was in flight)."""


# --------------------------------------------------------------------------
# command line


@dataclasses.dataclass
class EndSpec:
    """One side as given on the command line."""

    role: str                    # "input" or "output"
    kind: str                    # "blkio" or "file"
    name: str                    # the driver (blkio) or the path (file)
    props: List[str] = dataclasses.field(default_factory=list)
    connect_timeout: Optional[float] = 30.0     # --connect-timeout, for blkio.open
    reconnect: bool = False                     # --reconnect (where the path is a daemon's socket)
    reconnect_timeout: Optional[float] = 30.0   # --reconnect-timeout

    @property
    def option(self) -> str:
        return f"--{self.role}-{self.kind}={self.name}"

    @property
    def where(self) -> str:
        """The option and, for a device, its path: what open errors name."""
        paths = [p.partition("=")[2] for p in self.props if p.startswith("path=")]
        return f"{self.option} path={paths[-1]}" if paths else self.option

    def open_kwargs(self) -> Dict[str, Any]:
        """The properties as ``blkio.open`` keywords (``path`` kept a str)."""
        try:
            kwargs = parse_properties(self.props)
            check_properties(self.name, kwargs)
        except PropertyError as e:
            raise SpecError(f"{self.option}: {e}") from None
        for item in self.props:
            name, _, value = item.partition("=")
            if name == "path":
                kwargs["path"] = value
        kwargs.setdefault("connect_timeout", self.connect_timeout)
        if self.reconnect and DRIVER_FACTS[self.name].path_is_daemon_socket:
            kwargs["reconnect"] = True
            kwargs["reconnect_timeout"] = self.reconnect_timeout
        return kwargs


@dataclasses.dataclass
class Options:
    input: EndSpec
    output: EndSpec
    blocksize: Optional[int]
    depth: Optional[int]
    sparse: bool
    verify: bool
    json: bool
    progress: str
    progress_interval: float
    file_direct: str
    offload: str = "auto"


class _Parser(SuggestingParser):
    def error(self, message: str) -> Any:        # one line, not argparse's usage block
        raise SpecError(self.hint(message))


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, usage=USAGE.format(prog=prog), description=DESCRIPTION,
                allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    ends = p.add_argument_group("input and output (one of each, input first)")
    ends.add_argument("--input-blkio", metavar="DRIVER", help="a libblkio device: the "
                      "driver, then its PROPERTY=VALUE arguments")
    ends.add_argument("--input-file", metavar="PATH", help="a regular file or block device")
    ends.add_argument("--output-blkio", metavar="DRIVER", help="a libblkio device: the "
                      "driver, then its PROPERTY=VALUE arguments")
    ends.add_argument("--output-file", metavar="PATH", help="a regular file (created or "
                      "extended as needed) or block device")
    p.add_argument("--blocksize", type=size_type(), metavar="BYTES",
                   help="bytes per request (K/M/G suffixes; default: 1 MiB, or the devices' "
                        "optimal-io-size if larger, within max-transfer; a multiple of "
                        "both devices' request-alignment)")
    p.add_argument("--depth", type=int_type(), metavar="N",
                   help=f"chunks in flight, each a read then a write (default: {DEFAULT_DEPTH})")
    p.add_argument("--sparse", action="store_true",
                   help="write all-zero chunks as write-zeroes requests (holes on files)")
    p.add_argument("--verify", action="store_true",
                   help="after the copy, read both sides back and compare them byte for byte")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary on stdout (bytes, seconds, MiB/s, zero chunks)")
    p.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto",
                   help="progress on stderr: a bar (needs tqdm: pip install 'blkio[cli]'), "
                        "periodic lines, or nothing; auto: a bar when stderr is a terminal "
                        "and tqdm is installed, else lines (default: auto)")
    p.add_argument("--progress-interval", type=seconds_type, default=2.0, metavar="SECONDS",
                   help="seconds between progress lines (default: 2)")
    p.add_argument("--file-direct", choices=("auto", "on", "off"), default="auto",
                   help="O_DIRECT for --input-file/--output-file: auto reads an input whose "
                        "data is mostly in the page cache from there, and uses O_DIRECT "
                        "otherwise where the file system accepts it (default: auto)")
    p.add_argument("--connect-timeout", type=connect_timeout_type, default=30.0,
                   metavar="SECONDS", help=CONNECT_TIMEOUT_HELP)
    p.add_argument("--reconnect", action="store_true", help=RECONNECT_HELP)
    p.add_argument("--reconnect-timeout", type=connect_timeout_type, default=30.0,
                   metavar="SECONDS", help=RECONNECT_TIMEOUT_HELP)
    p.add_argument("--offload", choices=("auto", "off"), default="auto",
                   help="auto: a regular file to a regular file on the same file system, "
                        "without --sparse, --blocksize, --depth or --file-direct=on, is "
                        "copied by the kernel "
                        "(copy_file_range: a reflink or server-side copy where the file "
                        "system can, else a page-cache copy; not through libblkio); "
                        "off: always the libblkio pipeline (default: auto)")
    return p


# Options that take their value as the next argument, so the tokenizer below
# does not mistake it for a property.
_VALUE_OPTIONS = {"--blocksize", "--depth", "--progress", "--progress-interval", "--file-direct",
                  "--connect-timeout", "--reconnect-timeout", "--offload"}
_END_OPTIONS = {"--input-blkio", "--input-file", "--output-blkio", "--output-file"}


def parse_args(argv: Sequence[str], prog: str = PROG) -> Options:
    """Split ``argv`` as blkio-copy does: PROPERTY=VALUE arguments belong to
    the ``--input-blkio`` or ``--output-blkio`` before them; the rest goes to
    argparse.  Raises SpecError (or SystemExit for ``--help``)."""
    parser = build_parser(prog)
    ends: Dict[str, EndSpec] = {}
    rest: List[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if tok.startswith("-") and len(tok) > 1:
            name, eq, value = tok.partition("=")
            if name in _END_OPTIONS:
                if not eq:
                    if i >= len(argv):
                        raise SpecError(f"{name} needs a value")
                    value = argv[i]
                    i += 1
                role, kind = name[2:].split("-")
                if role in ends:
                    raise SpecError(f"only one --{role}-* option is allowed")
                if role == "output" and "input" not in ends:
                    raise SpecError("--output-* must come after an --input-* option")
                if not value:
                    raise SpecError(f"{name} needs a value")
                if kind == "blkio":
                    try:
                        check_driver(value)
                    except PropertyError as e:
                        raise SpecError(f"{name}={value}: {e}") from None
                ends[role] = EndSpec(role, kind, value)
                continue
            rest.append(tok)
            if name in _VALUE_OPTIONS and not eq and i < len(argv):
                rest.append(argv[i])
                i += 1
            continue
        current = ends.get("output") or ends.get("input")
        if current is None or current.kind != "blkio":
            raise SpecError(f"unexpected argument: {tok!r} (properties follow --input-blkio "
                            f"or --output-blkio)")
        if "=" not in tok or tok.startswith("="):
            raise SpecError(f"{current.option}: {tok!r}: missing property value "
                            f"(expected property=value)")
        current.props.append(tok)
    args = parser.parse_args(rest)
    if "input" not in ends:
        raise SpecError("missing --input-blkio or --input-file")
    if "output" not in ends:
        raise SpecError("missing --output-blkio or --output-file")
    for end in ends.values():
        end.connect_timeout = args.connect_timeout
        end.reconnect = args.reconnect
        end.reconnect_timeout = args.reconnect_timeout
    return Options(ends["input"], ends["output"], args.blocksize, args.depth, args.sparse,
                   args.verify, args.json, args.progress, args.progress_interval,
                   args.file_direct, args.offload)


# --------------------------------------------------------------------------
# the two ends


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


class End:
    """One opened side: the device, its queue, and for a regular file an fd
    of its own for the unaligned tail (O_DIRECT cannot reach it)."""

    def __init__(self, spec: EndSpec, dev: blkio.Device, *, path: Optional[str] = None,
                 direct: Optional[bool] = None, tail_fd: int = -1) -> None:
        self.spec = spec
        self.dev = dev
        self.queue = dev.queue(0)
        self.limits = dev.limits
        self.align = dev.limits.request_alignment
        self.path = path
        self.direct = direct
        self.tail_fd = tail_fd
        self.created = False          # output file created by us
        self.orig_size: Optional[int] = None   # output file's size before we extended it
        self.cached: Optional[float] = None    # input file: share in the page cache at open

    def split(self, n: int) -> Tuple[int, int]:
        """A chunk of ``n`` bytes as (bytes through the device, bytes through
        the tail fd).  A device gets whole blocks (padded: the caller zeroes
        the padding); a file with a tail fd gets exactly ``n``."""
        if self.tail_fd >= 0:
            body = n - n % self.align
            return body, n - body
        return _round_up(n, self.align), 0

    def describe(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"spec": self.spec.option, "driver": self.dev.driver,
                             "capacity": self.dev.capacity,
                             "request_alignment": self.align}
        if self.spec.kind == "file":
            d["direct"] = self.direct
        else:
            # the driver's own word where it has one; virtio-blk drivers
            # always bypass the host's page cache
            props = self.dev.properties()
            d["direct"] = bool(props.get("direct", True))
        if self.cached is not None:
            d["cached"] = round(self.cached, 3)     # share of the input in the page cache
        return d

    def close(self) -> None:
        try:
            self.dev.close()
        finally:
            if self.tail_fd >= 0:
                os.close(self.tail_fd)
                self.tail_fd = -1

    def abandon(self) -> None:
        """Close an output nothing was written to, and undo what opening it
        did to a file (created: removed; extended: cut back)."""
        self.dev.close()
        if self.tail_fd >= 0 and self.path is not None and self.orig_size is not None:
            _undo_output_file(self.path, self.tail_fd, self.created, self.orig_size)
            self.tail_fd = -1
        self.close()


def _identity(spec: EndSpec) -> Optional[Tuple[int, ...]]:
    """What ``spec`` names on this machine (inode, or device number for a
    block device), to refuse copying something onto itself."""
    path = spec.name if spec.kind == "file" else None
    if spec.kind == "blkio":
        for item in spec.props:
            key, _, value = item.partition("=")
            if key == "path":
                path = value
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode):
        return (0, st.st_rdev)
    return (st.st_dev, st.st_ino)


def _open_blkio(spec: EndSpec, read_only: bool) -> blkio.Device:
    kwargs = spec.open_kwargs()
    if read_only and "read_only" not in kwargs:
        kwargs["read_only"] = True
    try:
        return blkio.open(spec.name, **kwargs)
    except (ValueError, TypeError) as e:
        raise SpecError(f"{spec.option}: {e}") from None


def _open_file_device(spec: EndSpec, path: str, read_only: bool,
                      file_direct: str) -> Tuple[blkio.Device, bool]:
    """io_uring on ``path``, with O_DIRECT unless refused (``auto``) or off."""
    if file_direct != "off":
        try:
            return blkio.open("io_uring", path=path, direct=True, read_only=read_only), True
        except OSError as e:
            # EINVAL: the file system has no O_DIRECT (libblkio says so at connect).
            if file_direct == "on" or e.errno != errno.EINVAL:
                raise
    return blkio.open("io_uring", path=path, direct=False, read_only=read_only), False


def _file_kind(spec: EndSpec, st: os.stat_result) -> str:
    if stat.S_ISREG(st.st_mode):
        return "regular"
    if stat.S_ISBLK(st.st_mode):
        return "block"
    raise SpecError(f"{spec.option}: not a regular file or block device")


def open_input(spec: EndSpec, file_direct: str) -> End:
    if spec.kind == "blkio":
        dev = _open_blkio(spec, read_only=True)
        end = End(spec, dev)
        if dev.capacity % end.align:
            end.close()
            raise SpecError(f"{spec.option}: capacity {dev.capacity} is not a multiple of its "
                            f"request-alignment {end.align}; use --input-file for a file "
                            f"of any size")
        return end
    path = spec.name
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)      # buffered: for the tail
    try:
        _file_kind(spec, os.fstat(fd))
        share = cached_share(fd, os.lseek(fd, 0, os.SEEK_END))
        if file_direct == "auto" and share is not None and share >= CACHED_ENOUGH:
            # O_DIRECT reads bypass the page cache: data that is there
            # would be read from the disk again.
            file_direct = "off"
        dev, direct = _open_file_device(spec, path, True, file_direct)
    except BaseException:
        os.close(fd)
        raise
    end = End(spec, dev, path=path, direct=direct, tail_fd=fd)
    end.cached = share
    return end


def cached_share(fd: int, size: int, probes: int = CACHE_PROBES) -> Optional[float]:
    """The share of ``probes`` pages spread over the first ``size`` bytes of
    ``fd`` that are in the page cache, or None when the kernel cannot say.

    mincore(2) answers without reading (``_memory.resident_pages``), but
    only to the file's owner or a caller that may write it (or root): for
    anyone else it would call every page absent, so that is None too."""
    page = os.sysconf("SC_PAGE_SIZE")
    npages = -(-size // page)
    n = min(probes, npages)
    if n <= 0:
        return None
    st = os.fstat(fd)
    if (os.geteuid() not in (0, st.st_uid)
            and not os.access(f"/proc/self/fd/{fd}", os.W_OK)):
        return None
    try:
        hits = resident_pages(fd, [(2 * i + 1) * npages // (2 * n) * page for i in range(n)])
    except OSError:                     # no mmap on this file system
        return None
    return hits / n


def open_output(spec: EndSpec, length: int, file_direct: str) -> End:
    """Open the output for ``length`` bytes of input; a regular output file is
    created or extended to ``length`` (never truncated)."""
    if spec.kind == "blkio":
        end = End(spec, _open_blkio(spec, read_only=False))
    else:
        path = spec.name
        try:
            st: Optional[os.stat_result] = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is not None and _file_kind(spec, st) == "block":
            dev, direct = _open_file_device(spec, path, False, file_direct)
            end = End(spec, dev, path=path, direct=direct)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            orig = os.fstat(fd).st_size
            try:
                if orig < length:
                    os.ftruncate(fd, length)
                dev, direct = _open_file_device(spec, path, False, file_direct)
            except BaseException:
                _undo_output_file(path, fd, st is None, orig)
                raise
            end = End(spec, dev, path=path, direct=direct, tail_fd=fd)
            end.created = st is None
            end.orig_size = orig
    # A device (not a regular file, which was extended) must hold the input,
    # padded to its block size.
    if end.tail_fd < 0 and end.dev.capacity < _round_up(length, end.align):
        cap = end.dev.capacity
        end.close()
        raise SpecError(f"{spec.option}: the output ({cap} bytes, {_fmt_bytes(cap)}) is smaller "
                        f"than the input ({length} bytes, {_fmt_bytes(length)})")
    return end


def _undo_output_file(path: str, fd: int, created: bool, orig: int) -> None:
    """Leave an output file as it was when nothing was written to it."""
    try:
        if created:
            os.unlink(path)
        elif os.fstat(fd).st_size != orig:
            os.ftruncate(fd, orig)
    except OSError:
        pass
    os.close(fd)


def choose_geometry(src: End, dst: End, length: int, blocksize: Optional[int],
                    depth: Optional[int]) -> Tuple[int, int]:
    """(blocksize, depth) from the options, or from both devices' limits."""
    lims = (src.limits, dst.limits)
    unit = max(max(l.request_alignment, l.buf_alignment, l.mem_region_alignment) for l in lims)
    caps = [l.max_transfer for l in lims if l.max_transfer]
    caps += [l.max_segment_len for l in lims if l.max_segment_len]
    cap = min(caps) // unit * unit if caps else 0
    if blocksize is None:
        want = DEFAULT_BLOCKSIZE
        for l in lims:
            if l.optimal_io_size:
                want = _round_up(want, l.optimal_io_size)
        if cap:
            want = min(want, cap)
        blocksize = max(unit, want // unit * unit)
    else:
        if blocksize % unit:
            raise SpecError(f"--blocksize={blocksize} is not a multiple of the devices' "
                            f"alignment ({unit} bytes)")
        if cap and blocksize > cap:
            raise SpecError(f"--blocksize={blocksize} exceeds the devices' max-transfer "
                            f"({cap} bytes)")
    slots = min(src.queue.depth or 1 << 30, dst.queue.depth or 1 << 30)
    if depth is None:
        depth = DEFAULT_DEPTH
    elif depth > slots:
        raise SpecError(f"--depth={depth} exceeds the queues' size ({slots} requests)")
    depth = max(1, min(depth, slots, -(-length // blocksize) or 1))
    return blocksize, depth


# --------------------------------------------------------------------------
# progress


class Progress:
    """Progress on a stream: ``update(done)`` with bytes done so far.  Its
    rate is the average since ``begin()`` (the copy's start), in MiB/s: the
    figure of the summary line."""

    start = 0.0

    def begin(self) -> None:
        """The copy starts now."""
        self.start = time.monotonic()

    def rate(self, done: int) -> float:
        """Bytes per second since the start."""
        elapsed = time.monotonic() - self.start
        return done / elapsed if elapsed > 0 else 0.0

    def update(self, done: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NoProgress(Progress):
    def update(self, done: int) -> None:
        pass


class LineProgress(Progress):
    """A plain line every ``interval`` seconds: bytes, percent, rate, ETA."""

    def __init__(self, label: str, total: int, stream: TextIO, interval: float) -> None:
        self.label, self.total, self.stream, self.interval = label, total, stream, interval
        self.begin()
        self.next_at = self.start + interval

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now < self.next_at:
            return
        self.next_at = now + self.interval
        rate = self.rate(done)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        pct = 100.0 * done / self.total if self.total else 100.0
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?"
        print(f"{self.label}: {_fmt_bytes(done)} of {_fmt_bytes(self.total)} ({pct:.0f}%), "
              f"{rate / MiB:.1f} MiB/s, ETA {eta_text}", file=self.stream, flush=True)


class BarProgress(Progress):
    """tqdm's bar, with ETA and our rate (tqdm's own rate is an average in
    decimal units whatever the divisor: it read 1.46 GB/s beside a summary's
    822 MiB/s)."""

    def __init__(self, label: str, total: int, stream: TextIO, tqdm: Any) -> None:
        try:
            sized = os.get_terminal_size(stream.fileno()).columns > 0
        except (OSError, ValueError, AttributeError):
            sized = False
        # A terminal that reports no size (a fresh pty: 0 x 0) would get no
        # bar at all from tqdm: give it the usual 80 x 24 instead.
        import shutil
        fallback = shutil.get_terminal_size()
        width: Dict[str, Any] = ({"dynamic_ncols": True} if sized else
                                 {"ncols": fallback.columns, "nrows": fallback.lines})
        fmt = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
        self.bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                        bar_format=fmt, file=stream, leave=True, **width)
        self.done = 0
        self.begin()

    def _show_rate(self) -> None:
        self.bar.set_postfix_str(f"{self.rate(self.done) / MiB:.1f} MiB/s", refresh=False)

    def update(self, done: int) -> None:
        if done > self.done:
            self.done = done
            self._show_rate()
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self._show_rate()        # the last one: the summary's, flush included
        self.bar.close()


def _import_tqdm() -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def make_progress(mode: str, label: str, total: int, interval: float,
                  stream: Optional[TextIO] = None) -> Progress:
    stream = stream if stream is not None else sys.stderr
    if mode == "none":
        return NoProgress()
    if mode in ("auto", "bar"):
        tqdm = _import_tqdm()
        if tqdm is not None and (mode == "bar" or stream.isatty()):
            return BarProgress(label, total, stream, tqdm)
    return LineProgress(label, total, stream, interval)


# --------------------------------------------------------------------------
# the pipeline


class _Chunk:
    """One chunk on its way: the requests it has in flight (the queue of
    each) and the step to run when they are all done (None: done)."""

    __slots__ = ("index", "offset", "length", "slot", "pending", "step", "zeroed")

    def __init__(self, index: int, offset: int, length: int, slot: int) -> None:
        self.index, self.offset, self.length, self.slot = index, offset, length, slot
        self.pending: List[blkio.Queue] = []
        self.step: Optional[Callable[["_Chunk"], None]] = None
        self.zeroed = False


class Pipeline:
    """Runs chunks through steps that enqueue requests on the two queues,
    with at most ``depth`` chunks (slots) at a time.  It blocks on the queue
    of the oldest chunk and polls the other, so both devices stay busy
    without a thread.  ``should_stop()`` true: no new chunk starts, chunks
    whose requests are in flight are waited for, and unfinished ones are
    dropped.  A failed request (or step) stops the pipeline the same way,
    except that the chunks before the failed one still finish; the error of
    the first failed chunk is raised at the end.  ``queues`` maps each queue
    to the name its errors carry ("input", "output")."""

    def __init__(self, queues: Dict[blkio.Queue, str], depth: int,
                 should_stop: Callable[[], bool]) -> None:
        self.queues = queues
        self.depth = depth
        self.should_stop = should_stop
        self.error: Optional[Exception] = None
        self.error_index = -1              # the chunk that failed first
        self.done_bytes = 0
        self.done_below = 0                # chunks [0, done_below) are all done
        self._done_above: set = set()
        self._enqueued: set = set()
        self.on_done: Callable[[_Chunk], None] = lambda ch: None

    def issue(self, ch: _Chunk, q: blkio.Queue, enqueue: Callable[..., Any], *args: Any,
              **kwargs: Any) -> None:
        """Enqueue one request of ``ch`` on ``q`` (``enqueue`` is its method)."""
        enqueue(*args, user_data=ch, **kwargs)
        ch.pending.append(q)
        self._enqueued.add(q)

    def _stopping(self, ch: Optional[_Chunk] = None) -> bool:
        """No new chunk once stopping; a chunk on its way goes on only if it
        comes before a failed one (and Ctrl-C was not pressed)."""
        if self.should_stop():
            return True
        if self.error is None:
            return False
        return ch is None or ch.index > self.error_index

    def _fail(self, ch: _Chunk, error: Exception) -> None:
        if self.error is None or ch.index < self.error_index:
            self.error, self.error_index = error, ch.index
        ch.step = _dropped

    def _advance(self, ch: _Chunk, active: Dict[int, _Chunk], free: deque) -> None:
        """Run ``ch``'s steps until it has requests in flight, is done, or is
        dropped (stopping, or a step failed); the last two free its slot."""
        while not ch.pending:
            step = ch.step
            if step is None:
                self._finish(ch)
                break
            if step is _dropped or self._stopping(ch):
                break                      # dropped: not done
            ch.step = None
            try:
                step(ch)
            except Exception as e:         # a synchronous part failed (tail I/O, compare)
                self._fail(ch, e)
        else:
            return
        del active[ch.index]
        free.append(ch.slot)

    def _finish(self, ch: _Chunk) -> None:
        self.done_bytes += ch.length
        if ch.index == self.done_below:
            self.done_below += 1
            while self.done_below in self._done_above:
                self._done_above.remove(self.done_below)
                self.done_below += 1
        else:
            self._done_above.add(ch.index)
        self.on_done(ch)

    def _complete(self, q: blkio.Queue, comps: List[blkio.Completion],
                  active: Dict[int, _Chunk], free: deque,
                  on_error: Callable[[_Chunk, blkio.Completion], bool]) -> None:
        for c in comps:
            ch: _Chunk = c.user_data
            ch.pending.remove(q)
            if c.ret < 0 and not on_error(ch, c):
                try:
                    c.check()
                except OSError as e:
                    self._fail(ch, OSError(e.errno, f"{self.queues[q]}: {c.op} of {c.length} "
                                                    f"bytes at offset {ch.offset}: {e.strerror}"))
            if not ch.pending:
                self._advance(ch, active, free)

    def run(self, nchunks: int, chunk_size: int, total: int, first_step: Callable[[_Chunk], None],
            on_error: Callable[[_Chunk, blkio.Completion], bool] = lambda ch, c: False) -> None:
        """Pass chunks ``0..nchunks-1`` (``chunk_size`` bytes each, the last
        one up to ``total``) through their steps, starting with ``first_step``."""
        free: deque = deque(range(self.depth))
        active: Dict[int, _Chunk] = {}
        next_index = 0
        while True:
            while free and next_index < nchunks and not self._stopping():
                off = next_index * chunk_size
                ch = _Chunk(next_index, off, min(chunk_size, total - off), free.popleft())
                ch.step = first_step
                active[ch.index] = ch
                next_index += 1
                self._advance(ch, active, free)
            for q in self._enqueued:
                q.submit()
            self._enqueued.clear()
            if not active:
                break
            head = next(iter(active.values()))
            if not head.pending:          # dropped chunks leave with their steps
                self._advance(head, active, free)
                continue
            wait_q = head.pending[0]
            self._complete(wait_q, wait_q.wait(1), active, free, on_error)
            for q in self.queues:
                if q is not wait_q and q.in_flight:  # the other device: what is done
                    self._complete(q, q.completions(), active, free, on_error)
        if self.error is not None:
            raise self.error


def _dropped(ch: _Chunk) -> None:
    """The step of a chunk that failed: never run (the pipeline is stopping
    by then), it only keeps the chunk from counting as done."""


def _all_zero(a: np.ndarray) -> bool:
    n8 = a.size - a.size % 8
    return not (a[:n8].view(np.uint64).any() or a[n8:].any())


@dataclasses.dataclass
class Result:
    length: int
    copied: int = 0              # bytes from offset 0 known to be on the output
    seconds: float = 0.0
    zero_chunks: int = 0
    zero_bytes: int = 0
    verified: Optional[bool] = None
    verify_seconds: float = 0.0
    interrupted: bool = False
    flushed: bool = False
    in_flight_abandoned: int = 0
    method: str = "pipeline"     # or "copy_file_range" (Copier.copy says why)


class Copier:
    """Copies ``length`` bytes from ``src`` to ``dst`` through a ring of
    ``depth`` slots of ``blocksize`` bytes in one ``blkio.Buffer`` mapped into
    both devices (zero copy on every driver)."""

    def __init__(self, src: End, dst: End, length: int, blocksize: int, depth: int, *,
                 sparse: bool = False, should_stop: Callable[[], bool] = lambda: False,
                 offload: bool = False) -> None:
        self.src, self.dst = src, dst
        self.length, self.bs, self.depth = length, blocksize, depth
        self.sparse = sparse
        self.offload = offload
        self.should_stop = should_stop
        self.nchunks = -(-length // blocksize)
        self.result = Result(length)
        self._rings: List[Tuple[blkio.Buffer, np.ndarray]] = []
        self._tail: Optional[Tuple[int, bytes]] = None    # (offset, bytes) for the output file
        self.pipeline: Optional[Pipeline] = None

    def _ring(self, n: int) -> np.ndarray:
        """``n`` slots of aligned memory mapped into both devices."""
        buf = blkio.Buffer(n * self.bs, name="blkio-copy")
        arr = np.frombuffer(memoryview(buf), np.uint8)
        for end in (self.src, self.dst):
            end.dev.register(arr)
        self._rings.append((buf, arr))
        return arr.reshape(n, self.bs)

    # -- reading a chunk from either side, padded for the output -----------

    def _read(self, end: End, ch: _Chunk, buf: np.ndarray, padded: int,
              p: Pipeline) -> None:
        """Enqueue ``end``'s part of ``ch`` into ``buf``; read an unaligned
        tail through the buffered fd now; zero the padding up to ``padded``."""
        body, tail = end.split(ch.length)
        if tail:
            got = os.preadv(end.tail_fd, [buf[body:body + tail].data], ch.offset + body)
            if got < tail:
                buf[body + got:body + tail] = 0       # short file: zeroes (blkio-copy)
        if padded > ch.length:
            buf[ch.length:padded] = 0
        if body:
            p.issue(ch, end.queue, end.queue.read, ch.offset, buf[:body])

    # -- copy ---------------------------------------------------------------

    def copy(self, progress: Progress) -> Result:
        """Copy everything: in the kernel where ``kernel_copy_possible``,
        else through the pipeline; then flush the output."""
        if self.kernel_copy_possible():
            try:
                return self._copy_in_kernel(progress)
            except _NoKernelCopy:
                pass                   # nothing written: the pipeline does it all
        return self._copy_pipeline(progress)

    def kernel_copy_possible(self) -> bool:
        """Offload asked for, no --sparse (the kernel would write zeroes as
        data), and both ends regular files on one file system, opened by
        path: then ``copy_file_range`` copies without a buffer of ours, a
        reflink or a server-side copy where the file system can, and writes
        into the output's page cache otherwise (no O_DIRECT: the final
        flush writes it out)."""
        if not self.offload or self.sparse or self.length == 0:
            return False
        if self.src.tail_fd < 0 or self.dst.tail_fd < 0:
            return False
        a, b = os.fstat(self.src.tail_fd), os.fstat(self.dst.tail_fd)
        return stat.S_ISREG(a.st_mode) and stat.S_ISREG(b.st_mode) and a.st_dev == b.st_dev

    def _copy_in_kernel(self, progress: Progress) -> Result:
        """``copy_file_range`` from the input's fd to the output's, in
        ``KERNEL_CHUNK`` steps, then one ``fdatasync``.  When the input is
        in the page cache, the output's writeback is started every
        ``WRITEBACK_STEP`` bytes, so the disk writes while the copy goes
        on; when it is not, the disk is left to the reads until the end
        (writes mixed with them made cold copies slower here).  Past the
        output's old size (a hole since open_output extended it) holes of
        the input are skipped.  Raises _NoKernelCopy if the first call is
        refused."""
        src_fd, dst_fd = self.src.tail_fd, self.dst.tail_fd
        res, length = self.result, self.length
        holes_from = self.dst.orig_size if self.dst.orig_size is not None else length
        step = WRITEBACK_STEP if (self.src.cached or 0.0) >= CACHED_ENOUGH else length + 1
        res.method = "copy_file_range"
        start = time.monotonic()
        off = kicked = 0
        error: Optional[Exception] = None
        try:
            while off < length and not self.should_stop():
                n = min(KERNEL_CHUNK, length - off)
                if off >= holes_from:
                    data = _seek(src_fd, off, os.SEEK_DATA, length)
                    if data > off:
                        off = res.copied = data
                        continue
                    n = min(n, _seek(src_fd, off, os.SEEK_HOLE, length) - off)
                try:
                    got = os.copy_file_range(src_fd, dst_fd, n, off, off)
                except OSError as e:
                    if off == 0 and e.errno in _NO_KERNEL_COPY:
                        res.method = "pipeline"
                        raise _NoKernelCopy() from e
                    raise OSError(e.errno, f"copy_file_range of {n} bytes at offset {off}: "
                                           f"{e.strerror}") from None
                if got == 0:
                    raise OSError(errno.EIO, f"input: the file ended at byte {off}, before "
                                             f"its size when the copy started ({length})")
                off = res.copied = off + got
                if off - kicked >= step:
                    # POSIX_FADV_DONTNEED starts writeback of the dirty pages
                    # without waiting (and keeps them while they are written).
                    os.posix_fadvise(dst_fd, kicked, off - kicked, os.POSIX_FADV_DONTNEED)
                    kicked = off
                progress.update(off)
        except _NoKernelCopy:
            raise
        except Exception as e:             # I/O errors: flush what was written first
            error = e
        finally:
            progress.close()
        try:
            os.fdatasync(dst_fd)
            res.flushed = True
        except OSError as e:
            error = error or e
        res.seconds = time.monotonic() - start
        if error is not None:
            raise error
        if self.should_stop() and off < length:
            res.interrupted = True
            raise Interrupted()
        return res

    def _copy_pipeline(self, progress: Progress) -> Result:
        ring = self._ring(self.depth)
        src, dst, res = self.src, self.dst, self.result
        max_zeroes = dst.limits.max_write_zeroes_len
        zeroes_ok = [self.sparse]

        def read_step(ch: _Chunk) -> None:
            body, tail = dst.split(ch.length)
            self._read(src, ch, ring[ch.slot], body + tail, p)
            ch.step = write_step

        def write_step(ch: _Chunk) -> None:
            buf = ring[ch.slot]
            body, tail = dst.split(ch.length)
            if tail:
                # Written after every O_DIRECT write has completed, with the
                # flush: the buffered write of the file's last partial block
                # must not race a direct write into the same page.
                self._tail = (ch.offset + body, bytes(buf[body:body + tail]))
            if not body:
                return
            ch.zeroed = (zeroes_ok[0] and (not max_zeroes or body <= max_zeroes)
                         and _all_zero(buf[:body + tail]))
            if ch.zeroed:
                p.issue(ch, dst.queue, dst.queue.write_zeroes, ch.offset, body)
            else:
                p.issue(ch, dst.queue, dst.queue.write, ch.offset, buf[:body])

        def on_error(ch: _Chunk, c: blkio.Completion) -> bool:
            if ch.zeroed and -c.ret in (errno.EOPNOTSUPP, errno.ENOTSUP):
                zeroes_ok[0] = False      # the device cannot: write the zeroes instead
                ch.zeroed = False
                ch.step = write_step
                return True
            return False

        def on_done(ch: _Chunk) -> None:
            if ch.zeroed:
                res.zero_chunks += 1
                res.zero_bytes += ch.length
            progress.update(p.done_bytes)

        p = self.pipeline = Pipeline({src.queue: "input", dst.queue: "output"}, self.depth,
                                     self.should_stop)
        p.on_done = on_done
        progress.begin()
        start = progress.start
        error: Optional[Exception] = None
        try:
            try:
                p.run(self.nchunks, self.bs, self.length, read_step, on_error)
            except Exception as e:             # I/O errors: flush what was written first
                error = e
            finally:
                # A second Ctrl-C (KeyboardInterrupt) passes through with the count.
                res.copied = min(p.done_below * self.bs, self.length)
            try:
                self._finish_output()
            except OSError as e:
                error = error or e
        finally:
            # closed after the flush: the bar's last rate is the summary's
            progress.close()
        res.seconds = time.monotonic() - start
        if error is not None:
            raise error
        if self.should_stop():
            res.interrupted = True
            raise Interrupted()
        return res

    def _finish_output(self) -> None:
        """Write the output file's unaligned tail, then flush."""
        if self._tail is not None:
            off, data = self._tail
            os.pwrite(self.dst.tail_fd, data, off)
            self._tail = None
        self.dst.dev.flush()
        self.result.flushed = True

    # -- verify -------------------------------------------------------------

    def verify(self, progress: Progress) -> Result:
        """Read both sides back and compare: raises VerifyError on the first
        difference."""
        ring = self._ring(2 * self.depth).reshape(self.depth, 2, self.bs)
        src, dst, res = self.src, self.dst, self.result

        def read_step(ch: _Chunk) -> None:
            body, tail = dst.split(ch.length)
            self._read(src, ch, ring[ch.slot, 0], body + tail, p)
            self._read(dst, ch, ring[ch.slot, 1], body + tail, p)
            ch.step = compare_step

        def compare_step(ch: _Chunk) -> None:
            body, tail = dst.split(ch.length)
            a, b = ring[ch.slot, 0, :body + tail], ring[ch.slot, 1, :body + tail]
            if not np.array_equal(a.view(np.uint64) if a.size % 8 == 0 else a,
                                  b.view(np.uint64) if b.size % 8 == 0 else b):
                first = int(np.flatnonzero(a != b)[0])
                raise VerifyError(ch.offset + first)

        p = Pipeline({src.queue: "input", dst.queue: "output"}, self.depth, self.should_stop)
        p.on_done = lambda ch: progress.update(p.done_bytes)
        start = time.monotonic()
        try:
            p.run(self.nchunks, self.bs, self.length, read_step)
        finally:
            res.verify_seconds = time.monotonic() - start
            progress.close()
        if self.should_stop():
            raise Interrupted()
        res.verified = True
        return res

    def close(self) -> None:
        self._rings.clear()


class _NoKernelCopy(Exception):
    """copy_file_range refused the first chunk: use the pipeline."""


# What copy_file_range says when it cannot copy between these files at all.
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM}


def _seek(fd: int, off: int, whence: int, end: int) -> int:
    """``lseek`` with SEEK_DATA/SEEK_HOLE, capped at ``end`` (ENXIO: none
    left before the end of the file)."""
    try:
        return min(os.lseek(fd, off, whence), end)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return end
        raise


class VerifyError(Exception):
    def __init__(self, offset: int) -> None:
        super().__init__(f"verify: the output differs from the input at byte {offset}")
        self.offset = offset


# --------------------------------------------------------------------------
# main


class _StopOnSigint:
    """First Ctrl-C: ask the copy to stop after what is in flight.  A second
    one raises KeyboardInterrupt at once (Python's default handler)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def __call__(self) -> bool:
        return self.requested

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> "_StopOnSigint":
        # Started with SIGINT ignored (nohup, a shell's background job): keep
        # it so, as Unix tools and Python's own start-up do.
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _summary(opts: Options, src: End, dst: End, c: Copier) -> Dict[str, Any]:
    r = c.result
    seconds = r.seconds if r.seconds > 0 else 1e-9
    out: Dict[str, Any] = {
        "bytes": r.copied,
        "seconds": round(r.seconds, 6),
        "mib_per_s": round(r.copied / seconds / MiB, 1),
        "zero_chunks": r.zero_chunks,
        "zero_bytes": r.zero_bytes,
        "input_bytes": r.length,
        "chunks": c.nchunks,
        "blocksize": c.bs,
        "depth": c.depth,
        "sparse": opts.sparse,
        "verified": r.verified,
        "verify_seconds": round(r.verify_seconds, 6) if opts.verify else None,
        "interrupted": r.interrupted,
        "method": r.method,
        "bounced_bytes": src.dev.stats.bounced_bytes + dst.dev.stats.bounced_bytes,
        "input": src.describe(),
        "output": dst.describe(),
    }
    if r.method == "copy_file_range":     # the devices were open, the kernel copied
        out.update(chunks=-(-r.length // KERNEL_CHUNK), blocksize=KERNEL_CHUNK, depth=1)
        out["input"]["direct"] = out["output"]["direct"] = False
    return out


def _sayer(prog: str) -> Callable[[str], None]:
    def say(msg: str) -> None:
        print(f"{prog}: {msg}", file=sys.stderr, flush=True)
    return say


def main(argv: Sequence[str], prog: Optional[str] = None) -> int:
    """Run ``blkio copy ARGS``; returns the exit status.  ``prog``: the name
    messages show (default: as invoked)."""
    prog = prog if prog is not None else f"{program_name()} copy"
    say = _sayer(prog)
    # Everything imported so far lives until the process exits: leave it
    # out of the cyclic collector's passes, during the copy and at exit
    # (where they are most of what the interpreter's teardown costs).
    gc.freeze()
    try:
        return _main(argv, prog, say)
    except KeyboardInterrupt:        # Ctrl-C outside the copy itself (closing, printing)
        say("interrupted")
        return EXIT_INTERRUPTED


def _main(argv: Sequence[str], prog: str, say: Callable[[str], None]) -> int:
    try:
        opts = parse_args(argv, prog)
    except SpecError as e:
        say(str(e))
        return EXIT_USAGE
    ident_in = _identity(opts.input)
    if ident_in is not None and ident_in == _identity(opts.output):
        say(f"{opts.input.option} and {opts.output.option} are the same file or device")
        return EXIT_USAGE
    src: Optional[End] = None
    dst: Optional[End] = None
    copier: Optional[Copier] = None
    try:
        side = opts.input.where
        try:
            src = open_input(opts.input, opts.file_direct)
            length = src.dev.capacity
            side = opts.output.where
            dst = open_output(opts.output, length, opts.file_direct)
            try:
                bs, depth = choose_geometry(src, dst, length, opts.blocksize, opts.depth)
            except SpecError:
                dst.abandon()
                dst = None
                raise
        except SpecError as e:
            say(str(e))
            return EXIT_USAGE
        except KeyboardInterrupt:
            say("interrupted before copying anything")
            return EXIT_INTERRUPTED
        except OSError as e:
            say(open_failure(side, e))
            return EXIT_FAILURE
        copier = Copier(src, dst, length, bs, depth, sparse=opts.sparse,
                        offload=(opts.offload == "auto" and opts.file_direct != "on"
                                 and opts.blocksize is None and opts.depth is None))
        return _run(opts, src, dst, copier, say)
    finally:
        if copier is not None:
            copier.close()
        for end in (dst, src):
            if end is not None:
                end.close()


def _run(opts: Options, src: End, dst: End, copier: Copier,
         say: Callable[[str], None]) -> int:
    res = copier.result
    status = 0
    phase = "copy"
    with _StopOnSigint() as stop:
        copier.should_stop = stop
        try:
            try:
                copier.copy(make_progress(opts.progress, "copy", res.length,
                                          opts.progress_interval))
                if opts.verify:
                    phase = "verify"
                    copier.verify(make_progress(opts.progress, "verify", res.length,
                                                opts.progress_interval))
            except Interrupted:
                res.interrupted = True
                say(f"interrupted during the {phase}: the first {res.copied} bytes "
                    f"({_fmt_bytes(res.copied)}, {_pct(res)} of {_fmt_bytes(res.length)}) "
                    f"are copied{' and flushed' if res.flushed else ''}; every request in "
                    f"flight was waited for")
                status = EXIT_INTERRUPTED
        except KeyboardInterrupt:
            p = copier.pipeline
            res.interrupted = True
            if p is not None:
                res.copied = min(p.done_below * copier.bs, res.length)
            say(f"interrupted again: stopped at once; the first {res.copied} bytes "
                f"({_fmt_bytes(res.copied)}) are copied, not flushed; closing the devices "
                f"waits for the requests in flight")
            status = EXIT_INTERRUPTED
        except VerifyError as e:
            res.verified = False
            say(str(e))
            status = EXIT_FAILURE
        except OSError as e:
            say(f"{e}; the first {res.copied} bytes ({_fmt_bytes(res.copied)}) are copied"
                f"{' and flushed' if res.flushed else ''}")
            status = EXIT_FAILURE
    if opts.json:
        import json
        print(json.dumps(_summary(opts, src, dst, copier)))
    if status == 0:          # the summary, whatever --progress says
        rate = res.copied / res.seconds / MiB if res.seconds > 0 else 0.0
        zeroes = f", {res.zero_chunks} zero chunk(s) as write-zeroes" if opts.sparse else ""
        check = ", verified" if res.verified else ""
        say(f"copied {res.copied} bytes ({_fmt_bytes(res.copied)}) in {res.seconds:.2f} s "
            f"({rate:.1f} MiB/s){zeroes}{check}")
    return status


def _pct(res: Result) -> str:
    return f"{100.0 * res.copied / res.length:.0f}%" if res.length else "100%"
