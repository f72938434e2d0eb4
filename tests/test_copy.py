"""``python -m blkio copy``: libblkio's blkio-copy, pipelined.

Every copy runs as a subprocess in a temp directory (the installed package,
not the source tree) and is checked byte for byte against the source with
os.pread: between every pair of plain file / io_uring / vhost-user (and a
loop device), with --sparse and --verify, with a short file padded on a
device, with bad specs (exit 2, nothing written), with progress on a pty and
on a pipe, and with Ctrl-C in the middle of a throttled copy.  File to file
goes through the kernel (copy_file_range) unless told otherwise; an input
file is read buffered or with O_DIRECT by what the page cache holds: both
are tried with the file in the page cache and out of it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import pytest

from conftest import Image, Inject, convert_to_qcow2, qcow2_host_offset, require, write_image

MiB = 1 << 20
#: not a multiple of the 1 MiB default blocksize, so the last chunk is short;
#: more chunks than the default depth (32), so the ring of slots wraps.
SIZE = 35 * MiB + 12 * 1024


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _copy(cwd, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blkio", "copy", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=_env())


def _ok(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def _read(path, offset: int = 0, n: Optional[int] = None) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read() if n is None else f.read(n)


def _image_with_zero_chunks(make_image, size: int, zero_chunks: List[int],
                            chunk: int = MiB) -> Image:
    img = make_image(size)
    data = bytearray(img.data)
    for i in zero_chunks:
        data[i * chunk:(i + 1) * chunk] = bytes(min(chunk, size - i * chunk))
    return _rewrite(img, bytes(data))


def _rewrite(img: Image, data: bytes) -> Image:
    with open(img.path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Image(img.path, data)


# ---------------------------------------------------------------------------
# the three kinds of end, as input and as output


class Source:
    """An input holding ``image``'s bytes, and its command-line spec."""

    def __init__(self, args: List[str], image: Image):
        self.args, self.image = args, image


class Target:
    """An output: its spec, and how to read what it holds now."""

    def __init__(self, args: List[str], read: Callable[[int, int], bytes], before: bytes):
        self.args, self.read, self.before = args, read, before


def _source(kind: str, image: Image, qsd) -> Source:
    if kind == "file":
        return Source([f"--input-file={image.path}"], image)
    if kind == "io_uring":      # buffered, where --input-file uses O_DIRECT
        return Source(["--input-blkio=io_uring", f"path={image.path}"], image)
    daemon = qsd(image=image)
    return Source(["--input-blkio=virtio-blk-vhost-user", f"path={daemon.socket}"], image)


def _target(kind: str, tmp_path: Path, make_image, qsd, size: int) -> Target:
    """Outputs other than a new file start 1 MiB larger and full of random
    bytes: the copy must replace the first ``size`` and leave the rest."""
    if kind == "file":
        path = tmp_path / "out.raw"
        return Target([f"--output-file={path}"], lambda off, n: _read(path, off, n), b"")
    img = make_image(size + MiB)
    if kind == "io_uring":
        return Target(["--output-blkio=io_uring", f"path={img.path}", "direct=true"],
                      img.pread, img.data)
    daemon = qsd(image=img)
    return Target(["--output-blkio=virtio-blk-vhost-user", f"path={daemon.socket}"],
                  img.pread, img.data)


KINDS = ["file", "io_uring", "vhost-user"]


@pytest.mark.parametrize("out_kind", KINDS)
@pytest.mark.parametrize("in_kind", KINDS)
def test_copy_between_every_pair_is_byte_for_byte(tmp_path, make_image, qsd, in_kind, out_kind):
    src = _source(in_kind, make_image(SIZE), qsd)
    dst = _target(out_kind, tmp_path, make_image, qsd, SIZE)
    res = _ok(_copy(tmp_path, *src.args, *dst.args, "--json"))
    assert res["bytes"] == res["input_bytes"] == SIZE
    if in_kind == out_kind == "file":
        assert res["method"] == "copy_file_range"
        assert (res["chunks"], res["blocksize"], res["depth"]) == (5, 8 * MiB, 1)
    else:
        assert res["method"] == "pipeline"
        assert res["chunks"] == 36 and res["blocksize"] == MiB and res["depth"] == 32
    assert res["interrupted"] is False and res["zero_chunks"] == 0
    assert res["bounced_bytes"] == 0      # one Buffer mapped into both devices
    assert dst.read(0, SIZE) == src.image.data
    if dst.before:
        assert dst.read(SIZE, MiB) == dst.before[SIZE:]
    else:
        assert os.path.getsize(tmp_path / "out.raw") == SIZE


def test_small_blocksize_and_depth_one_still_copy_everything(tmp_path, make_image):
    img = make_image(SIZE)
    out = tmp_path / "out.raw"
    res = _ok(_copy(tmp_path, f"--input-file={img.path}", f"--output-file={out}",
                    "--blocksize=64K", "--depth=1", "--json"))
    assert (res["blocksize"], res["depth"], res["chunks"]) == (65536, 1, SIZE // 65536 + 1)
    assert _read(out) == img.data


def test_loop_device_to_file_and_short_file_to_loop_device(tmp_path, make_image, loopdev):
    out = tmp_path / "from-loop.raw"
    _ok(_copy(tmp_path, f"--input-file={loopdev.path}", f"--output-file={out}", "--json"))
    assert _read(out) == loopdev.backing.data

    short = make_image(5000)                  # not a multiple of 512
    res = _ok(_copy(tmp_path, f"--input-file={short.path}", f"--output-file={loopdev.path}",
                    "--json"))
    assert res["bytes"] == 5000
    written = loopdev.backing.pread(0, 8192)
    assert written[:5000] == short.data
    assert written[5000:5120] == bytes(120)              # padded to the 512-byte block
    assert written[5120:] == loopdev.backing.data[5120:8192]


# ---------------------------------------------------------------------------
# padding and output size


@pytest.mark.parametrize("out_kind", ["io_uring", "vhost-user"])
@pytest.mark.parametrize("size", [1000, 9 * MiB + 1000])
def test_short_file_is_padded_with_zeroes_to_the_device_block(tmp_path, make_image, qsd,
                                                              out_kind, size):
    """The 9 MiB + 1000 case ends in a slot that held random bytes before
    (10 chunks, 8 slots): the padding must be zeroed, not left over."""
    short = make_image(size)
    dst = _target(out_kind, tmp_path, make_image, qsd, size + 4 * MiB)
    res = _ok(_copy(tmp_path, f"--input-file={short.path}", *dst.args, "--json"))
    assert res["bytes"] == size
    end = size + 24                                       # the rest of the 512-byte block
    assert dst.read(0, size) == short.data
    assert dst.read(size, 24) == bytes(24)
    assert dst.read(end, 4096) == dst.before[end:end + 4096]


def test_file_to_file_keeps_the_exact_size_through_o_direct(tmp_path, make_image):
    short = make_image(MiB + 1000)
    out = tmp_path / "out.raw"
    res = _ok(_copy(tmp_path, f"--input-file={short.path}", f"--output-file={out}", "--json",
                    "--file-direct=on"))
    assert res["method"] == "pipeline"
    assert res["output"]["direct"] is True and res["input"]["direct"] is True
    assert _read(out) == short.data


def test_longer_output_file_is_not_truncated(tmp_path, make_image):
    src = make_image(MiB + 1000)
    out = make_image(3 * MiB, "existing.raw")
    _ok(_copy(tmp_path, f"--input-file={src.path}", f"--output-file={out.path}", "--json"))
    after = _read(out.path)
    assert len(after) == 3 * MiB
    assert after[:MiB + 1000] == src.data and after[MiB + 1000:] == out.data[MiB + 1000:]


def test_shorter_output_file_is_extended(tmp_path, make_image):
    src = make_image(2 * MiB)
    out = make_image(4096, "short.raw")
    _ok(_copy(tmp_path, f"--input-file={src.path}", f"--output-file={out.path}", "--json"))
    assert _read(out.path) == src.data


def test_empty_input_file_copies_nothing(tmp_path, make_image):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    res = _ok(_copy(tmp_path, f"--input-file={empty}", f"--output-file={out}", "--json"))
    assert res["bytes"] == 0 and out.read_bytes() == b""


# ---------------------------------------------------------------------------
# the data path: the kernel copy of file to file, and input files read from
# the page cache or with O_DIRECT by what the page cache holds

#: not a multiple of 512 bytes nor of a page, more than one kernel chunk (8 MiB)
ODD = 9 * MiB + 4096 + 1000


def _resident_pages(fd: int, size: int) -> int:
    """How many of the file's pages are in the page cache (mincore(2) of a
    shared mapping: it reads nothing)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = os.sysconf("SC_PAGE_SIZE")
    vec = ctypes.create_string_buffer(-(-size // page))
    addr = libc.mmap(None, size, 1, 1, fd, 0)          # PROT_READ, MAP_SHARED
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
    finally:
        libc.munmap(addr, size)
    return sum(b & 1 for b in vec.raw)


def _evict(path) -> None:
    """Take ``path`` out of the page cache (a cold file, without dropping
    every cache on the machine), and check that it left."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        size = os.fstat(fd).st_size
        # a pass can miss pages still in another CPU's LRU batch or under
        # writeback: again until none is left (a busy machine needs a few)
        for _ in range(50):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if size == 0 or _resident_pages(fd, size) == 0:
                return
            time.sleep(0.02)
        pytest.fail(f"{path}: {_resident_pages(fd, size)} pages stay in the page cache "
                    "after fsync and 50 POSIX_FADV_DONTNEED")
    finally:
        os.close(fd)


def _warm(path) -> None:
    with open(path, "rb") as f:
        while f.read(8 * MiB):
            pass


def _cache(path, state: str) -> None:
    (_warm if state == "warm" else _evict)(path)


def _sparse_file(path: Path, size: int, extents: List[Tuple[int, int]]) -> bytes:
    """A file of ``size`` bytes, holes but for random bytes at each
    (offset, length) of ``extents``; returns its bytes."""
    data = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in extents:
            chunk = os.urandom(n)
            f.seek(off)
            f.write(chunk)
            data[off:off + n] = chunk
        f.flush()
        os.fsync(f.fileno())
    return bytes(data)


@pytest.mark.parametrize("cache", ["warm", "cold"])
@pytest.mark.parametrize("size", [1000, ODD])
def test_file_to_file_is_copied_by_the_kernel_byte_for_byte(tmp_path, make_image, cache, size):
    img = make_image(size)
    _cache(img.path, cache)
    out = tmp_path / "out.raw"
    res = _ok(_copy(tmp_path, f"--input-file={img.path}", f"--output-file={out}", "--json"))
    assert res["method"] == "copy_file_range" and res["bytes"] == size
    assert res["output"]["direct"] is False and res["bounced_bytes"] == 0
    assert _read(out) == img.data


def test_kernel_copy_keeps_the_holes_of_a_sparse_input_in_a_new_output(tmp_path):
    src = tmp_path / "sparse.raw"
    size = 40 * MiB + 1000                     # ends in a hole
    data = _sparse_file(src, size, [(0, MiB), (17 * MiB + 512, MiB + 1000)])
    out = tmp_path / "out.raw"
    res = _ok(_copy(tmp_path, f"--input-file={src}", f"--output-file={out}", "--json"))
    assert res["method"] == "copy_file_range" and res["bytes"] == size
    assert _read(out) == data
    assert os.stat(out).st_blocks * 512 <= 4 * MiB          # about the 2 MiB of data


def test_kernel_copy_writes_zeroes_where_the_input_has_holes_over_old_data(tmp_path, make_image):
    """Below the output's old size the holes of the input are copied as
    zeroes; past it (the extended part) they may stay holes."""
    old = make_image(8 * MiB, "existing.raw")
    src = tmp_path / "sparse.raw"
    data = _sparse_file(src, 20 * MiB, [(2 * MiB, MiB), (12 * MiB, 4096)])
    res = _ok(_copy(tmp_path, f"--input-file={src}", f"--output-file={old.path}", "--json"))
    assert res["method"] == "copy_file_range"
    assert _read(old.path) == data


def test_kernel_copy_into_a_longer_file_leaves_the_rest(tmp_path, make_image):
    src, out = make_image(ODD), make_image(ODD + 3 * MiB, "longer.raw")
    _evict(src.path)
    res = _ok(_copy(tmp_path, f"--input-file={src.path}", f"--output-file={out.path}",
                    "--json"))
    assert res["method"] == "copy_file_range"
    after = _read(out.path)
    assert after[:ODD] == src.data and after[ODD:] == out.data[ODD:]


@pytest.mark.parametrize("option", ["--offload=off", "--sparse", "--blocksize=1M", "--depth=8",
                                    "--file-direct=on"])
def test_options_of_the_pipeline_keep_file_to_file_in_the_pipeline(tmp_path, make_image,
                                                                   option):
    img = make_image(ODD)
    out = tmp_path / "out.raw"
    res = _ok(_copy(tmp_path, f"--input-file={img.path}", f"--output-file={out}", "--json",
                    option))
    assert res["method"] == "pipeline"
    assert _read(out) == img.data


def test_file_to_a_file_on_another_file_system_goes_through_the_pipeline(tmp_path, make_image):
    shm = Path("/dev/shm")
    require(shm.is_dir() and os.stat(shm).st_dev != os.stat(tmp_path).st_dev,
            "/dev/shm is not a file system of its own here")
    img = make_image(ODD)
    out = shm / f"blkio-copy-test-{os.getpid()}.raw"
    try:
        res = _ok(_copy(tmp_path, f"--input-file={img.path}", f"--output-file={out}", "--json"))
        assert res["method"] == "pipeline"
        assert _read(out) == img.data
    finally:
        out.unlink(missing_ok=True)


def _copy_with(tmp_path, pre: str, *args) -> subprocess.CompletedProcess:
    """The copy command in a child whose ``os`` functions ``pre`` replaced:
    how a kernel without copy_file_range, or a disk that fills up, looks."""
    code = f"import os, errno, time\n{pre}\nimport sys\nfrom blkio.cli import main\n" \
           f"sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "copy", *map(str, args)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=_env())


def test_a_refused_copy_file_range_falls_back_to_the_pipeline(tmp_path, make_image):
    img = make_image(ODD)
    out = tmp_path / "out.raw"
    pre = ("def refuse(*a):\n"
           "    raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))\n"
           "os.copy_file_range = refuse")
    res = _ok(_copy_with(tmp_path, pre, f"--input-file={img.path}", f"--output-file={out}",
                         "--json"))
    assert res["method"] == "pipeline"
    assert _read(out) == img.data


def test_kernel_copy_error_midway_flushes_and_says_how_far_it_got(tmp_path, make_image):
    """The third copy_file_range call fails with ENOSPC."""
    img = make_image(ODD + 16 * MiB)
    out = tmp_path / "out.raw"
    pre = ("real, calls = os.copy_file_range, [0]\n"
           "def full(*a):\n"
           "    calls[0] += 1\n"
           "    if calls[0] == 3:\n"
           "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
           "    return real(*a)\n"
           "os.copy_file_range = full")
    proc = _copy_with(tmp_path, pre, f"--input-file={img.path}", f"--output-file={out}",
                      "--json")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert f"copy_file_range of {8 * MiB} bytes at offset {16 * MiB}: " in last, last
    assert "No space left on device" in last
    assert f"the first {16 * MiB} bytes" in last and "flushed" in last
    assert json.loads(proc.stdout)["bytes"] == 16 * MiB
    assert _read(out, 0, 16 * MiB) == img.data[:16 * MiB]


def test_ctrl_c_during_a_kernel_copy_waits_flushes_and_says_how_far_it_got(tmp_path,
                                                                             make_image):
    """Each 8 MiB copy_file_range call made to take 0.3 s; Ctrl-C after two
    progress lines."""
    img = make_image(64 * MiB)
    out = tmp_path / "out.raw"
    pre = ("import os, time; real = os.copy_file_range; "
           "os.copy_file_range = lambda *a: (time.sleep(0.3), real(*a))[1]; ")
    proc = _spawn(tmp_path, [f"--input-file={img.path}", f"--output-file={out}", "--json",
                             "--progress=lines", "--progress-interval=0.2"], subprocess.PIPE,
                  pre=pre)
    assert proc.stderr is not None and proc.stdout is not None
    lines = re.compile(r"copy: [\d.]+ MiB of 64\.0 MiB")
    _read_until(proc.stderr.fileno(), lambda s: len(lines.findall(s)) >= 2, 30)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    last = stderr.decode().splitlines()[-1]
    m = re.search(r"interrupted during the copy: the first (\d+) bytes .* are copied and "
                  r"flushed", last)
    assert m, last
    copied = int(m.group(1))
    assert 0 < copied < 64 * MiB and copied % (8 * MiB) == 0
    assert json.loads(stdout)["method"] == "copy_file_range"
    assert _read(out, 0, copied) == img.data[:copied]


def test_resident_pages_refuses_an_offset_off_a_page(image):
    from blkio._memory import resident_pages
    fd = os.open(image.path, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="page-aligned"):
            resident_pages(fd, [512])
        with pytest.raises(ValueError, match="page-aligned"):
            resident_pages(fd, [-4096])
        with pytest.raises(TypeError, match="integer"):
            resident_pages(fd, [4096.0])
    finally:
        os.close(fd)


def test_cached_share_tells_a_file_in_the_page_cache_from_one_out_of_it(tmp_path, make_image):
    from blkio._copy import cached_share
    img = make_image(ODD)
    fd = os.open(img.path, os.O_RDONLY)
    try:
        _warm(img.path)
        share = cached_share(fd, img.size)
        require(share is not None, "this file system cannot mmap a file (mincore needs it)")
        assert share == 1.0
        _evict(img.path)
        assert cached_share(fd, img.size) == 0.0
        # the probe reads nothing: a cold file stays cold (a read probe,
        # even RWF_NOWAIT, starts readahead and warms what it measures)
        assert _resident_pages(fd, img.size) == 0
        assert cached_share(fd, 0) is None
    finally:
        os.close(fd)


@pytest.mark.parametrize("cache", ["warm", "cold"])
@pytest.mark.parametrize("out_kind", ["file", "vhost-user"])
def test_an_input_file_is_read_from_the_page_cache_when_it_is_there(tmp_path, make_image, qsd,
                                                                    out_kind, cache):
    """Through the pipeline (file to file with --offload=off): buffered
    reads when the file is in the page cache, O_DIRECT when it is not."""
    src = make_image(ODD)
    dst = _target(out_kind, tmp_path, make_image, qsd, ODD)
    _cache(src.path, cache)
    res = _ok(_copy(tmp_path, f"--input-file={src.path}", *dst.args, "--offload=off",
                    "--json"))
    assert res["method"] == "pipeline"
    assert res["input"]["direct"] is (cache == "cold")
    assert dst.read(0, ODD) == src.data


@pytest.mark.parametrize("cache", ["warm", "cold"])
def test_sparse_input_file_to_vhost_user_reads_its_holes_as_zeroes(tmp_path, make_image, qsd,
                                                                    cache):
    src = tmp_path / "sparse.raw"
    data = _sparse_file(src, ODD, [(MiB + 4096, 2 * MiB), (ODD - 1000, 1000)])
    _cache(src, cache)
    dst = _target("vhost-user", tmp_path, make_image, qsd, ODD)
    res = _ok(_copy(tmp_path, f"--input-file={src}", *dst.args, "--json"))
    assert res["bytes"] == ODD
    assert dst.read(0, ODD) == data


@pytest.mark.parametrize("cache", ["warm", "cold"])
def test_vhost_user_to_file_byte_for_byte(tmp_path, make_image, qsd, cache):
    """The daemon's file warm or cold; the output a new file of an odd size's
    device (the export is padded to 512 bytes)."""
    img = make_image(ODD + 24)              # a multiple of 512
    _cache(img.path, cache)
    src = _source("vhost-user", img, qsd)
    out = tmp_path / "out.raw"
    res = _ok(_copy(tmp_path, *src.args, f"--output-file={out}", "--json"))
    assert res["method"] == "pipeline" and res["bytes"] == img.size
    assert _read(out) == img.data


# ---------------------------------------------------------------------------
# --sparse and --verify


ZERO_CHUNKS = [1, 2, 5, 35]      # chunk 35 is the short last one


@pytest.mark.parametrize("out_kind", KINDS)
def test_sparse_writes_zero_chunks_as_write_zeroes(tmp_path, make_image, qsd, out_kind):
    src = _image_with_zero_chunks(make_image, SIZE, ZERO_CHUNKS)
    dst = _target(out_kind, tmp_path, make_image, qsd, SIZE)
    res = _ok(_copy(tmp_path, f"--input-file={src.path}", *dst.args, "--sparse", "--json"))
    assert res["zero_chunks"] == len(ZERO_CHUNKS)
    assert res["zero_bytes"] == 3 * MiB + (SIZE - 35 * MiB)
    assert dst.read(0, SIZE) == src.data                  # the random bytes were zeroed
    if out_kind == "file":
        # write-zeroes may unmap: a new file keeps holes where the zeroes are.
        assert os.stat(tmp_path / "out.raw").st_blocks * 512 <= SIZE - 3 * MiB


def test_without_sparse_zero_chunks_are_plain_writes(tmp_path, make_image):
    src = _image_with_zero_chunks(make_image, SIZE, ZERO_CHUNKS)
    out = tmp_path / "out.raw"
    res = _ok(_copy(tmp_path, f"--input-file={src.path}", f"--output-file={out}", "--json"))
    assert res["zero_chunks"] == 0 and _read(out) == src.data


@pytest.mark.parametrize("out_kind", KINDS)
def test_verify_reads_back_and_reports_verified(tmp_path, make_image, qsd, out_kind):
    src = make_image(SIZE)
    dst = _target(out_kind, tmp_path, make_image, qsd, SIZE)
    proc = _copy(tmp_path, f"--input-file={src.path}", *dst.args, "--verify", "--sparse",
                 "--json")
    res = _ok(proc)
    assert res["verified"] is True and res["verify_seconds"] > 0
    assert "verified" in proc.stderr.splitlines()[-1]
    assert dst.read(0, SIZE) == src.data


@pytest.mark.parametrize("diff_at", [0, 3 * MiB + 17, SIZE - 1])
def test_verify_finds_the_first_differing_byte(tmp_path, make_image, diff_at):
    """The verify pass alone, on two files that differ in one byte."""
    from blkio import _copy as copy_mod
    src = make_image(SIZE)
    other = bytearray(src.data)
    other[diff_at] ^= 0xFF
    dst = _rewrite(make_image(SIZE), bytes(other))
    opts = copy_mod.parse_args([f"--input-file={src.path}", f"--output-file={dst.path}"])
    a = copy_mod.open_input(opts.input, "auto")
    b = copy_mod.open_output(opts.output, SIZE, "auto")
    try:
        c = copy_mod.Copier(a, b, SIZE, *copy_mod.choose_geometry(a, b, SIZE, None, None))
        with pytest.raises(copy_mod.VerifyError) as err:
            c.verify(copy_mod.NoProgress())
        assert err.value.offset == diff_at
        c.close()
    finally:
        b.close()
        a.close()


# ---------------------------------------------------------------------------
# bad specs: one line on stderr, exit status 2, nothing written


def _bad_cases(src: Image, out: Path, small: Image) -> List[Tuple[str, List[str], str]]:
    return [
        ("unknown driver", ["--input-blkio=nosuch", f"path={src.path}",
                            f"--output-file={out}"], "unknown driver"),
        ("missing property", ["--input-blkio=io_uring", f"--output-file={out}"], "needs 'path'"),
        ("unknown property", ["--input-blkio=io_uring", f"path={src.path}", "bogus-prop=1",
                              f"--output-file={out}"], "bogus"),
        ("property without value", ["--input-blkio=io_uring", f"path={src.path}", "direct",
                                    f"--output-file={out}"], "missing property value"),
        ("unknown option", [f"--input-file={src.path}", f"--output-file={out}", "--bogus"],
         "--bogus"),
        ("stray argument", [f"--input-file={src.path}", "stray", f"--output-file={out}"],
         "stray"),
        ("output before input", [f"--output-file={out}", f"--input-file={src.path}"],
         "after an --input"),
        ("no output", [f"--input-file={src.path}"], "missing --output"),
        ("two inputs", [f"--input-file={src.path}", f"--input-file={src.path}",
                        f"--output-file={out}"], "only one --input"),
        ("output smaller than input", [f"--input-file={src.path}", "--output-blkio=io_uring",
                                       f"path={small.path}"], "smaller than the input"),
        ("input is output", [f"--input-file={src.path}", "--output-blkio=io_uring",
                             f"path={src.path}"], "the same"),
        ("blocksize not aligned", [f"--input-file={src.path}", f"--output-file={out}",
                                   "--blocksize=1000"], "not a multiple"),
        ("depth zero", [f"--input-file={src.path}", f"--output-file={out}", "--depth=0"],
         "--depth"),
    ]


CASE_NAMES = [c[0] for c in _bad_cases(Image(Path("in"), b""), Path("out"),
                                       Image(Path("small"), b""))]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_spec_is_one_line_exit_2_and_writes_nothing(tmp_path, make_image, case):
    src, small = make_image(2 * MiB), make_image(MiB)
    out = tmp_path / "never.raw"
    _, args, needle = next(c for c in _bad_cases(src, out, small) if c[0] == case)
    proc = _copy(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("python -m blkio copy: ")
    assert needle in proc.stderr
    assert not out.exists()
    assert src.pread(0, src.size) == src.data and small.pread(0, small.size) == small.data


def test_same_vhost_user_socket_on_both_sides_is_refused(tmp_path, qsd):
    daemon = qsd(size=MiB)
    proc = _copy(tmp_path, "--input-blkio=virtio-blk-vhost-user", f"path={daemon.socket}",
                 "--output-blkio=virtio-blk-vhost-user", f"path={daemon.socket}", timeout=30)
    assert proc.returncode == 2 and "the same" in proc.stderr
    assert daemon.raw is not None and daemon.raw.pread(0, MiB) == daemon.raw.data


def test_bad_blocksize_leaves_an_existing_output_file_as_it_was(tmp_path, make_image):
    src, out = make_image(4 * MiB), make_image(MiB, "existing.raw")
    proc = _copy(tmp_path, f"--input-file={src.path}", f"--output-file={out.path}",
                 "--blocksize=1000")
    assert proc.returncode == 2
    assert _read(out.path) == out.data                   # extended, then cut back


def test_missing_input_file_is_one_line_exit_1(tmp_path):
    out = tmp_path / "never.raw"
    proc = _copy(tmp_path, f"--input-file={tmp_path / 'nope'}", f"--output-file={out}")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "No such file" in proc.stderr and not out.exists()
    assert proc.stderr.count(str(tmp_path / "nope")) == 1, proc.stderr


@pytest.mark.parametrize("progress", ["none", "lines"])
def test_the_summary_line_is_printed_whatever_the_progress_mode(tmp_path, make_image, progress):
    img = make_image(3 * MiB)
    out = tmp_path / "out.raw"
    proc = _copy(tmp_path, f"--input-file={img.path}", f"--output-file={out}",
                 f"--progress={progress}")
    assert proc.returncode == 0, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"python -m blkio copy: copied 3145728 bytes \(3\.0 MiB\) in [\d.]+ s "
                        r"\([\d.]+ MiB/s\)", last), proc.stderr
    if progress == "none":
        assert proc.stderr.count("\n") == 1


def test_bar_and_summary_give_the_same_rate(tmp_path, slow_socket):
    """The bar's last rate is the copy's average, flush included, in MiB/s:
    the summary's figure (8 MiB of zeroes into the 4 MiB/s export)."""
    require(importlib.util.find_spec("tqdm"), "tqdm is not installed (pip install 'blkio[cli]')")
    src = tmp_path / "zeroes.raw"
    with open(src, "wb") as f:
        f.truncate(8 * MiB)
    master, slave = pty.openpty()
    proc = _spawn(tmp_path, [f"--input-file={src}", "--output-blkio=virtio-blk-vhost-user",
                             f"path={slow_socket}"], slave)
    os.close(slave)
    try:
        text = _read_until(master, lambda s: "MiB/s)" in s, 60)
    finally:
        proc.wait(30)
        os.close(master)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == 0, text
    bars = re.findall(r"8\.00M/8\.00M \[[\d:<]+, ([\d.]+) MiB/s\]", text)
    summary = re.search(r"copied 8388608 bytes \(8\.0 MiB\) in [\d.]+ s \(([\d.]+) MiB/s\)", text)
    assert bars and summary, text
    # the same figure, but for the last digit's rounding
    assert abs(float(bars[-1]) - float(summary.group(1))) <= 0.1 + 1e-9, text


def test_read_error_mid_copy_exits_1_and_says_how_far_it_got(tmp_path, make_image, qsd):
    """blkdebug fails the read of guest byte 5 MiB (once)."""
    img = make_image(8 * MiB)
    qcow2 = convert_to_qcow2(img, tmp_path / "faulty.qcow2")
    sector = qcow2_host_offset(qcow2, 5 * MiB) // 512
    daemon = qsd(image=qcow2, faults=Inject(event="read_aio", errno=5, once=True,
                                             sector=sector, iotype="read"))
    out = tmp_path / "out.raw"
    proc = _copy(tmp_path, "--input-blkio=virtio-blk-vhost-user", f"path={daemon.socket}",
                 f"--output-file={out}", "--json")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    m = re.search(r"the first (\d+) bytes", proc.stderr)
    assert m, proc.stderr
    copied = int(m.group(1))
    # The chunks before the failed one finish: the copy reaches the failed chunk.
    assert f"input: read of {MiB} bytes at offset {copied}: " in proc.stderr
    assert copied == 5 * MiB
    assert _read(out, 0, copied) == img.data[:copied]
    assert json.loads(proc.stdout)["bytes"] == copied


# ---------------------------------------------------------------------------
# progress, Ctrl-C


def _spawn(cwd, args: List[str], stderr, pre: str = "",
           sigint=signal.SIG_DFL) -> subprocess.Popen:
    """The copy command in a child, started with SIGINT as ``sigint`` (by
    default as from a terminal, whatever this test run inherited)."""
    code = f"{pre}import sys; from blkio.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, "copy", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=stderr, env=_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))


def _read_until(fd: int, done: Callable[[str], bool], timeout: float) -> str:
    """Read ``fd`` until ``done(text so far)`` or ``timeout`` seconds."""
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done(out.decode(errors="replace")):
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:             # EIO: the pty's other side closed
                break
            if not chunk:
                break
            out += chunk
    return out.decode(errors="replace")


def _interrupt(proc: subprocess.Popen, fd: int) -> Tuple[int, str]:
    """SIGINT, then the exit status and the rest of ``fd``."""
    proc.send_signal(signal.SIGINT)
    rest = _read_until(fd, lambda s: False, 30)
    rc = proc.wait(30)
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            f.close()
    return rc, rest


LINE = re.compile(r"copy: [\d.]+ MiB of 64\.0 MiB \(\d+%\), [\d.]+ MiB/s, ETA \d\d:\d\d:\d\d")


def test_progress_lines_when_stderr_is_not_a_tty(tmp_path, slow_socket):
    out = tmp_path / "out.raw"
    proc = _spawn(tmp_path, ["--input-blkio=virtio-blk-vhost-user", f"path={slow_socket}",
                             f"--output-file={out}", "--progress-interval=0.2"],
                  subprocess.PIPE)
    try:
        assert proc.stderr is not None
        text = _read_until(proc.stderr.fileno(), lambda s: len(LINE.findall(s)) >= 3, 30)
        assert len(LINE.findall(text)) >= 3, text
        assert "\r" not in text and "\x1b" not in text
    finally:
        rc, rest = _interrupt(proc, proc.stderr.fileno())   # type: ignore[union-attr]
    assert rc == 130


def _pty_progress(tmp_path, slow_socket, pre: str, done: Callable[[str], bool]) -> str:
    master, slave = pty.openpty()
    out = tmp_path / "out.raw"
    proc = _spawn(tmp_path, ["--input-blkio=virtio-blk-vhost-user", f"path={slow_socket}",
                             f"--output-file={out}", "--progress-interval=0.2"], slave, pre)
    os.close(slave)
    try:
        text = _read_until(master, done, 30)
        rc, rest = _interrupt(proc, master)
        assert rc == 130, text + rest
        return text + rest
    finally:
        proc.kill() if proc.poll() is None else None
        proc.wait(10)
        os.close(master)


def test_progress_bar_with_rate_and_eta_on_a_tty(tmp_path, slow_socket):
    require(importlib.util.find_spec("tqdm"), "tqdm is not installed (pip install 'blkio[cli]')")
    # tqdm: "copy:  9%|▉  | 6.00M/64.0M [00:01<00:13, 4.0 MiB/s]", redrawn with \r
    bar = re.compile(r"copy:\s+\d+%\|[^|\r]*\| [\d.]+M/64\.0M \[\d\d:\d\d<\d\d:\d\d, "
                     r"[\d.]+ MiB/s\]")
    text = _pty_progress(tmp_path, slow_socket, "", lambda s: len(bar.findall(s)) >= 3)
    assert len(bar.findall(text)) >= 3, text
    assert "\r" in text
    assert "interrupted during the copy" in text


def test_progress_lines_on_a_tty_without_tqdm(tmp_path, slow_socket):
    pre = "import sys; sys.modules['tqdm'] = None; "     # import tqdm -> ImportError
    text = _pty_progress(tmp_path, slow_socket, pre, lambda s: len(LINE.findall(s)) >= 2)
    assert len(LINE.findall(text)) >= 2, text
    assert "%|" not in text


def test_a_copy_started_with_sigint_ignored_keeps_it_ignored(tmp_path, slow_socket):
    """As from ``nohup ... &``: SIGINT mid-copy changes nothing and the copy
    finishes.  12 MiB of zeroes into the throttled export (zeroes too, so
    the other tests still find them), about 3 s at 4 MiB/s."""
    src = tmp_path / "zeroes.raw"
    with open(src, "wb") as f:
        f.truncate(12 * MiB)
    proc = _spawn(tmp_path, [f"--input-file={src}", "--output-blkio=virtio-blk-vhost-user",
                             f"path={slow_socket}", "--progress=lines",
                             "--progress-interval=0.2"], subprocess.PIPE, sigint=signal.SIG_IGN)
    assert proc.stderr is not None and proc.stdout is not None
    lines = re.compile(r"copy: [\d.]+ MiB of 12\.0 MiB")
    seen = _read_until(proc.stderr.fileno(), lambda s: len(lines.findall(s)) >= 2, 30)
    assert len(lines.findall(seen)) >= 2, seen
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, seen + stderr.decode()
    assert "interrupted" not in stderr.decode()


def test_ctrl_c_mid_copy_waits_flushes_and_says_how_far_it_got(tmp_path, slow_socket):
    """Copy the throttled export (64 MiB of zeroes, 4 MiB/s) over a file of
    random bytes; Ctrl-C after a few MiB."""
    out = write_image(tmp_path / "out.raw", 64 * MiB)
    proc = _spawn(tmp_path, ["--input-blkio=virtio-blk-vhost-user", f"path={slow_socket}",
                             f"--output-file={out.path}", "--json", "--progress=lines",
                             "--progress-interval=0.2"], subprocess.PIPE)
    assert proc.stderr is not None and proc.stdout is not None
    _read_until(proc.stderr.fileno(), lambda s: len(LINE.findall(s)) >= 3, 30)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr.decode()
    last = stderr.decode().splitlines()[-1]
    m = re.match(r"python -m blkio copy: interrupted during the copy: the first (\d+) bytes "
                 r"\(.*\) are copied and flushed; every request in flight was waited for$", last)
    assert m, last
    copied = int(m.group(1))
    summary = json.loads(stdout)
    assert summary["interrupted"] is True and summary["bytes"] == copied
    assert 0 < copied < 64 * MiB and copied % MiB == 0
    after = _read(out.path)
    assert len(after) == 64 * MiB                         # never truncated
    assert after[:copied] == bytes(copied)                 # the zeroes are there
    # Beyond what was in flight (depth 32 x 1 MiB), nothing was touched.
    assert after[copied + 32 * MiB:] == out.data[copied + 32 * MiB:]


def test_copy_is_listed_in_the_cli_help(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "blkio", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 0 and "copy" in proc.stdout
    proc = _copy(tmp_path, "--help")
    assert proc.returncode == 0 and "--input-blkio=DRIVER" in proc.stdout


def test_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path, slow_socket):
    out = tmp_path / "out.raw"
    proc = _spawn(tmp_path, ["--input-blkio=virtio-blk-vhost-user", f"path={slow_socket}",
                             f"--output-file={out}", "--json", "--progress=lines",
                             "--progress-interval=0.2"], subprocess.PIPE)
    assert proc.stderr is not None
    _read_until(proc.stderr.fileno(), lambda s: len(LINE.findall(s)) >= 2, 30)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "Traceback" not in stderr.decode()
    assert "interrupted again: stopped at once" in stderr.decode().splitlines()[-1]
    assert json.loads(stdout)["interrupted"] is True


# ---- every side says whether it bypassed the page cache; --connect-timeout ----

def test_json_says_direct_for_blkio_sides_too(tmp_path, qsd, make_image):
    src = make_image(4 * MiB)
    daemon = qsd(size=4 * MiB)
    out = _ok(_copy(tmp_path, "--json", f"--input-blkio=io_uring", f"path={src.path}", "direct=0",
                    "--output-blkio=virtio-blk-vhost-user", f"path={daemon.socket}"))
    assert out["input"]["direct"] is False, out
    assert out["output"]["direct"] is True, out


def test_connect_timeout_bounds_every_command_on_a_busy_export(tmp_path, qsd, make_image):
    import blkio
    daemon = qsd(size=4 * MiB)
    with blkio.open("virtio-blk-vhost-user", path=daemon.socket):    # the export's one client
        for argv in (["info", "virtio-blk-vhost-user", f"path={daemon.socket}"],
                     ["bench", "--runtime=1", "virtio-blk-vhost-user", f"path={daemon.socket}"],
                     ["copy", f"--input-blkio=virtio-blk-vhost-user", f"path={daemon.socket}",
                      f"--output-file={tmp_path / 'out.raw'}"]):
            proc = subprocess.run([sys.executable, "-m", "blkio", *argv, "--connect-timeout", "0.5"],
                                  cwd=tmp_path, capture_output=True, text=True, timeout=60,
                                  env=_env())
            assert proc.returncode == 1, (argv, proc.returncode, proc.stderr)
            assert "Traceback" not in proc.stderr, proc.stderr
            assert "one client at a time" in proc.stderr or "timed out" in proc.stderr.lower(), \
                (argv, proc.stderr)
