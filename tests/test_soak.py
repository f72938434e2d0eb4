"""Soak: many device lifetimes and a million requests through each API leak
neither file descriptors nor memory.

Each test measures after a warm-up (allocator pools, freelists, numpy caches
fill once), then asserts that the fd count is unchanged and that resident
memory grew by less than a small bound.  The figures are printed (run with
``-s`` to see them; docs/bench-history.md quotes them).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os

import numpy as np
import pytest

import blkio

pytestmark = pytest.mark.soak

BS = 4096
MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
REQUESTS = int(os.environ.get("BLKIO_SOAK_REQUESTS", 1_000_000))


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _cycle(driver, props, i):
    with blkio.open(driver, **props) as dev:
        a = dev.alloc(MiB)
        mem = np.frombuffer(blkio.Buffer(256 * 1024), np.uint8)
        assert dev.register(mem)
        dev.readinto((i % 16) * BS, a[:BS])
        q = dev.queue(0)
        q.read(0, mem[:BS], user_data=i)
        assert q.wait(min=1, timeout=10)[0].ret == 0
        assert dev.unregister(mem)


@pytest.mark.parametrize("backend", ["io_uring", "vhost-user"])
def test_200_open_alloc_register_close_cycles_leak_nothing(backend, image, qsd):
    if backend == "io_uring":
        driver, props = "io_uring", {"path": str(image.path)}
    else:
        driver, props = "virtio-blk-vhost-user", {"path": qsd().socket}
    for i in range(10):                      # warm-up
        _cycle(driver, props, i)
    gc.collect()
    fd0, rss0 = fds(), rss()
    for i in range(200):
        _cycle(driver, props, i)
    gc.collect()
    fd1, rss1 = fds(), rss()
    print(f"\n{backend}: 200 cycles: fds {fd0} -> {fd1}, RSS {rss0 / MiB:.1f} -> {rss1 / MiB:.1f} MiB")
    assert fd1 == fd0
    assert rss1 - rss0 < 16 * MiB


def _blocking(dev, n, offsets):
    buf = dev.alloc(BS)
    readinto = dev.readinto
    for off in itertools.islice(offsets, n):     # a slice would copy 8 MB of list
        readinto(off, buf)


def _queue(dev, n, offsets):
    q = dev.queue(0)
    bufs = [dev.alloc(BS) for _ in range(32)]
    done = 0
    while done < n:
        k = min(32, n - done)
        for i in range(k):
            q.read(int(offsets[done + i]), bufs[i], user_data=i)
        got = 0
        while got < k:
            got += len(q.wait(min=k - got, timeout=10))
        done += k


def _batch(dev, n, offsets):
    q = dev.queue(0)
    bufs = dev.alloc(32 * BS).reshape(32, BS)
    out = np.zeros(32, dtype=[("user_data", np.int64), ("ret", np.int32)])
    offs = np.asarray(offsets, dtype=np.uint64)
    done = 0
    while done < n:
        k = min(32, n - done)
        q.submit_reads(offs[done:done + k], bufs[:k])
        got = 0
        while got < k:
            got += q.reap(out, min=1, timeout=10)
        done += k


def _asyncio(dev, n, offsets):
    async def main():
        adev = blkio.aio.AsyncDevice(dev)
        bufs = [dev.alloc(BS) for _ in range(32)]
        done = 0
        while done < n:
            k = min(32, n - done)
            await asyncio.gather(*(adev.readinto(int(offsets[done + i]), bufs[i])
                                   for i in range(k)))
            done += k
        adev.detach()             # the device stays open
    asyncio.run(main())


@pytest.mark.parametrize("api", [_blocking, _queue, _batch, _asyncio],
                         ids=["blocking", "queue", "batch", "asyncio"])
def test_a_million_requests_leak_nothing(api, image):
    with blkio.open("io_uring", path=str(image.path)) as dev:
        span = image.size // BS
        offsets = (np.random.default_rng(1).integers(0, span, REQUESTS) * BS).tolist()
        api(dev, 50_000, offsets)            # warm-up
        gc.collect()
        fd0, rss0 = fds(), rss()
        api(dev, REQUESTS, offsets)
        gc.collect()
        fd1, rss1 = fds(), rss()
        assert dev.stats.requests >= REQUESTS
    print(f"\n{api.__name__[1:]}: {REQUESTS} requests: fds {fd0} -> {fd1}, "
          f"RSS {rss0 / MiB:.1f} -> {rss1 / MiB:.1f} MiB")
    assert fd1 == fd0
    assert rss1 - rss0 < 8 * MiB
