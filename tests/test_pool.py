"""The bounce pool as a unit (through a real io_uring device on a temp file),
and the first-fit RangeAllocator under it, both against simple models."""

from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize, invariant,
                                 precondition, rule, run_state_machine_as_test)

import blkio
from blkio._core import RangeAllocator

KiB = 1 << 10
MiB = 1 << 20


@pytest.fixture
def dev(make_image):
    img = make_image(8 * MiB, "pool.raw")
    d = blkio.open("io_uring", img.path)
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def pool(dev):
    return dev.bounce_pool


def _addr(a: np.ndarray) -> int:
    return a.ctypes.data


def _round(n: int, g: int) -> int:
    return max(1, -(-n // g)) * g


# ---------------------------------------------------------------------------
# Basic semantics


def test_acquire_returns_writable_uint8_array_of_requested_length(pool):
    a = pool.acquire(10_000)
    try:
        assert isinstance(a, np.ndarray)
        assert a.dtype == np.uint8 and a.ndim == 1 and a.size == 10_000
        assert a.flags.c_contiguous and a.flags.writeable
        a[:] = 0xEE
        assert (a == 0xEE).all()
    finally:
        pool.release(a)
    assert pool.in_use == 0


def test_acquired_arrays_are_aligned_to_granule(pool):
    arrays = [pool.acquire(n) for n in (1, 4096, 5000, 12345, 64 * KiB)]
    try:
        for a in arrays:
            assert _addr(a) % pool.granule == 0
    finally:
        for a in arrays:
            pool.release(a)


def test_granule_is_a_page_multiple_of_mem_region_alignment(dev, pool):
    import mmap
    assert pool.granule % mmap.PAGESIZE == 0
    assert pool.granule % dev.limits.mem_region_alignment == 0


def test_in_use_counts_granule_rounded_bytes_and_returns_to_zero(pool):
    g = pool.granule
    assert pool.in_use == 0
    a = pool.acquire(1)
    assert pool.in_use == g
    b = pool.acquire(g + 1)
    assert pool.in_use == g + 2 * g
    pool.release(a)
    assert pool.in_use == 2 * g
    pool.release(b)
    assert pool.in_use == 0


def test_size_covers_in_use_and_is_bounded_by_max_size(pool):
    assert 0 < pool.size <= pool.max_size
    assert pool.size % pool.granule == 0
    a = pool.acquire(pool.size // 2)
    assert pool.in_use <= pool.size <= pool.max_size
    pool.release(a)


def test_acquire_larger_than_max_size_raises_value_error_at_once(pool):
    t0 = time.monotonic()
    with pytest.raises(ValueError):
        pool.acquire(pool.max_size + 1)
    with pytest.raises(ValueError):
        pool.acquire(pool.max_size + 1, timeout=5)
    assert time.monotonic() - t0 < 0.5
    assert pool.in_use == 0 and pool.waiting == 0


def test_acquire_larger_than_lowered_max_size_raises_value_error(pool):
    pool.max_size = 2 * MiB
    assert pool.max_size == 2 * MiB
    with pytest.raises(ValueError):
        pool.acquire(2 * MiB + 1)
    a = pool.acquire(2 * MiB)          # exactly max_size is fine
    assert pool.size <= pool.max_size == 2 * MiB
    pool.release(a)


def test_max_size_setter_rounds_to_granule_and_rejects_below_granule(pool):
    g = pool.granule
    pool.max_size = 3 * g + 1
    assert pool.max_size == 4 * g
    with pytest.raises(ValueError):
        pool.max_size = g - 1


def test_release_of_foreign_array_raises_value_error(pool):
    with pytest.raises(ValueError):
        pool.release(np.zeros(4096, np.uint8))
    assert pool.in_use == 0


def test_double_release_raises_value_error(pool):
    a = pool.acquire(4096)
    pool.release(a)
    with pytest.raises(ValueError):
        pool.release(a)
    assert pool.in_use == 0


def test_first_fit_reuses_the_lowest_hole(pool):
    g = pool.granule
    a, b, c, d = (pool.acquire(g) for _ in range(4))
    assert [_addr(x) for x in (a, b, c, d)] == sorted(_addr(x) for x in (a, b, c, d))
    pool.release(b)
    pool.release(d)
    e = pool.acquire(g)
    assert _addr(e) == _addr(b)
    for x in (a, c, e):
        pool.release(x)
    assert pool.in_use == 0


# ---------------------------------------------------------------------------
# Growth only when idle


def test_pool_grows_when_idle(pool):
    before = pool.size
    big = before + 3 * MiB
    a = pool.acquire(big)
    assert pool.size >= big > before
    assert pool.size <= pool.max_size
    pool.release(a)
    assert pool.in_use == 0


def test_pool_does_not_resize_while_in_use_and_grows_after_release(pool):
    held = pool.acquire(4096)
    size = pool.size
    big = size + MiB
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        pool.acquire(big, timeout=0.2)
    assert 0.15 <= time.monotonic() - t0 < 2.0
    assert pool.size == size                     # no resize under a live buffer
    assert pool.waiting == 0                     # the timed-out waiter left the queue
    assert held.ctypes.data == _addr(held)
    pool.release(held)
    a = pool.acquire(big, timeout=0.2)
    assert pool.size >= big > size
    pool.release(a)
    assert pool.in_use == 0


def test_waiter_for_a_bigger_pool_is_served_when_the_holder_releases(pool):
    held = pool.acquire(4096)
    big = pool.size + MiB
    got: List[Optional[np.ndarray]] = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(big, timeout=10)))
    t.start()
    _wait_until(lambda: pool.waiting == 1)
    time.sleep(0.1)
    assert not got
    pool.release(held)
    t.join(10)
    assert got and got[0].size == big
    pool.release(got[0])
    assert pool.in_use == 0


def test_live_buffer_contents_survive_other_acquires_and_growth(pool):
    a = pool.acquire(64 * KiB)
    a[:] = 0x42
    others = [pool.acquire(32 * KiB) for _ in range(8)]
    for o in others:
        o[:] = 0x99
    assert (a == 0x42).all()
    for o in others:
        pool.release(o)
    pool.release(a)


def test_single_granule_churn_never_hands_out_live_memory(pool):
    # The bounced 4 KiB request's pattern (the allocator's single-granule
    # path), with bigger buffers in between: each live array keeps its own
    # byte until released, and no two live arrays overlap.
    import random
    rnd = random.Random(7)
    g = pool.granule
    live: List[Tuple[np.ndarray, int]] = []
    tag = 0
    for step in range(3000):
        if live and (rnd.random() < 0.5 or pool.in_use > pool.size // 2):
            a, t = live.pop(0 if rnd.random() < 0.8 else rnd.randrange(len(live)))
            assert (a == t).all(), step
            pool.release(a)
            continue
        n = g if rnd.random() < 0.9 else rnd.choice([g + 1, 3 * g, 17 * g])
        a = pool.acquire(n, timeout=5)
        tag = tag % 255 + 1
        a[:] = tag
        live.append((a, tag))
        spans = sorted((_addr(x), _addr(x) + x.size) for x, _ in live)
        assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:])), step
    for a, t in live:
        assert (a == t).all()
        pool.release(a)
    assert pool.in_use == 0


# ---------------------------------------------------------------------------
# FIFO fairness


def _wait_until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def test_small_acquire_does_not_overtake_a_queued_waiter(pool):
    size = pool.size
    held = pool.acquire(size * 3 // 4)
    got: List[np.ndarray] = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(size // 2, timeout=10)))
    t.start()
    _wait_until(lambda: pool.waiting == 1)
    # There is room for 4 KiB, but a waiter is ahead: FIFO says wait.
    with pytest.raises(TimeoutError):
        pool.acquire(4096, timeout=0.2)
    assert pool.waiting == 1
    pool.release(held)
    t.join(10)
    assert got
    pool.release(got[0])
    assert pool.in_use == 0 and pool.waiting == 0


def test_large_waiter_is_not_starved_by_a_stream_of_small_acquires(pool):
    size = pool.size
    stop = threading.Event()
    errors: List[BaseException] = []
    small_done = [0]

    def churn():
        try:
            while not stop.is_set():
                a = pool.acquire(16 * KiB, timeout=10)
                time.sleep(0.001)
                pool.release(a)
                small_done[0] += 1
        except BaseException as e:       # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=churn) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        _wait_until(lambda: small_done[0] > 50)
        # Needs (almost) the whole pool: only possible if the small ones yield.
        t0 = time.monotonic()
        big = pool.acquire(size - pool.granule, timeout=5)
        waited = time.monotonic() - t0
        assert big.size == size - pool.granule
        pool.release(big)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert not errors, errors
    assert waited < 5
    assert small_done[0] > 50
    assert pool.in_use == 0 and pool.waiting == 0


def test_waiters_are_served_in_arrival_order(pool):
    size = pool.size
    held = pool.acquire(size)               # the whole pool
    order: List[int] = []
    lock = threading.Lock()

    def waiter(i: int):
        a = pool.acquire(size // 2 + 1, timeout=20)   # only one fits at a time
        with lock:
            order.append(i)
        time.sleep(0.02)
        pool.release(a)

    threads = []
    for i in range(5):
        t = threading.Thread(target=waiter, args=(i,))
        t.start()
        threads.append(t)
        _wait_until(lambda: pool.waiting == i + 1)
    pool.release(held)
    for t in threads:
        t.join(20)
    assert order == [0, 1, 2, 3, 4]
    assert pool.in_use == 0


# ---------------------------------------------------------------------------
# Property tests: the pool against a model


class PoolMachine(RuleBasedStateMachine):
    """Random acquire/release sequences.  Model: live arrays with their
    granule-rounded extents; the pool must give disjoint, granule-aligned,
    intact memory, count in_use exactly and stay within max_size."""

    MAX = 4 * MiB

    def __init__(self, dev):
        super().__init__()
        self.pool = dev.bounce_pool
        self.pool.max_size = self.MAX
        self.g = self.pool.granule
        self.live: Dict[int, Tuple[np.ndarray, int, int]] = {}   # id -> (array, rounded, tag)
        self.next_tag = 1

    arrays = Bundle("arrays")

    def _extents(self):
        return sorted((_addr(a), _addr(a) + r) for a, r, _ in self.live.values())

    def _fits(self, rounded: int) -> bool:
        """Is there a hole of ``rounded`` bytes inside the current pool?"""
        if not self.live:
            return True
        base = _pool_base(self.pool, next(iter(self.live.values()))[0])
        pos = base
        for start, end in self._extents():
            if start - pos >= rounded:
                return True
            pos = end
        return base + self.pool.size - pos >= rounded

    def _lowest_fit(self, rounded: int) -> Optional[int]:
        base = _pool_base(self.pool, next(iter(self.live.values()))[0])
        pos = base
        for start, end in self._extents():
            if start - pos >= rounded:
                return pos
            pos = end
        return pos if base + self.pool.size - pos >= rounded else None

    @rule(target=arrays, n=st.one_of(st.integers(1, 64 * KiB), st.integers(1, 1536 * KiB)))
    def acquire(self, n):
        rounded = _round(n, self.g)
        expected = self._lowest_fit(rounded) if self.live else None
        fits = self._fits(rounded)
        try:
            a = self.pool.acquire(n, timeout=0)
        except TimeoutError:
            assert not fits, f"{n} bytes fit in a hole but acquire timed out"
            assert self.pool.waiting == 0
            return None
        assert fits, f"acquire({n}) succeeded though no hole fits: {self._extents()}"
        if expected is not None:
            assert _addr(a) == expected, "not first fit"
        assert a.size == n
        tag = self.next_tag % 251 + 1
        self.next_tag += 1
        a[:] = tag
        self.live[id(a)] = (a, rounded, tag)
        return a

    @rule(n=st.integers(4 * MiB + 1, 16 * MiB))
    def acquire_too_big(self, n):
        with pytest.raises(ValueError):
            self.pool.acquire(n, timeout=0)

    @rule(a=consumes(arrays))
    def release(self, a):
        if a is None:
            return
        _, rounded, tag = self.live.pop(id(a))
        assert (a == tag).all(), "live buffer was overwritten"
        self.pool.release(a)

    @invariant()
    def no_overlap_and_aligned(self):
        ext = self._extents()
        for (s1, e1), (s2, e2) in zip(ext, ext[1:]):
            assert e1 <= s2, f"overlap {s1:#x}-{e1:#x} / {s2:#x}-{e2:#x}"
        for s, _ in ext:
            assert s % self.g == 0

    @invariant()
    def inside_the_pool(self):
        for a, r, _ in self.live.values():
            base = _pool_base(self.pool, a)
            assert base <= _addr(a) and _addr(a) + r <= base + self.pool.size

    @invariant()
    def in_use_matches_model(self):
        assert self.pool.in_use == sum(r for _, r, _ in self.live.values())

    @invariant()
    def bounded_size(self):
        assert self.pool.in_use <= self.pool.size <= self.pool.max_size == self.MAX

    def teardown(self):
        for a, r, tag in list(self.live.values()):
            assert (a == tag).all()
            self.pool.release(a)
        self.live.clear()
        assert self.pool.in_use == 0
        assert self.pool.waiting == 0


def _pool_base(pool, arr: np.ndarray) -> int:
    """Start address of the pool memory behind an acquired array."""
    owner = arr.base
    while owner is not None and not isinstance(owner, blkio.Buffer):
        owner = owner.obj if isinstance(owner, memoryview) else getattr(owner, "base", None)
    assert isinstance(owner, blkio.Buffer), "acquired array is not pool memory"
    return owner.address


def test_pool_random_acquire_release_matches_model(dev):
    run_state_machine_as_test(
        lambda: PoolMachine(dev),
        settings=settings(max_examples=60, stateful_step_count=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]))
    assert dev.bounce_pool.in_use == 0


# ---------------------------------------------------------------------------
# RangeAllocator against a brute-force first-fit model


def _first_fit(free: List[bool], count: int) -> int:
    run = 0
    for i, f in enumerate(free):
        run = run + 1 if f else 0
        if run == count:
            return i - count + 1
    return -1


def _largest_run(free: List[bool]) -> int:
    best = run = 0
    for f in free:
        run = run + 1 if f else 0
        best = max(best, run)
    return best


_ops = st.lists(st.one_of(st.tuples(st.just("alloc"), st.integers(1, 40)),
                          st.tuples(st.just("free"), st.integers(0, 10_000))),
                max_size=120)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 130), ops=_ops)
def test_range_allocator_matches_first_fit_model(n, ops):
    ra = RangeAllocator(n)
    free = [True] * n
    live: Dict[int, int] = {}
    assert len(ra) == n
    assert ra.used == 0 and ra.largest_free == n
    for op, arg in ops:
        if op == "alloc":
            want = _first_fit(free, arg) if arg <= n else -1
            got = ra.allocate(arg)
            assert got == want, (op, arg, free)
            if got >= 0:
                for i in range(got, got + arg):
                    free[i] = False
                live[got] = arg
        elif live:
            start = sorted(live)[arg % len(live)]
            ra.release(start)
            for i in range(start, start + live.pop(start)):
                free[i] = True
        assert ra.used == free.count(False)
        assert ra.largest_free == _largest_run(free)
    for start in list(live):
        ra.release(start)
    assert ra.used == 0 and ra.largest_free == n


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 64), starts=st.lists(st.integers(0, 70), max_size=5))
def test_range_allocator_release_of_unallocated_start_raises_value_error(n, starts):
    ra = RangeAllocator(n)
    a = ra.allocate(1)
    for s in starts:
        if s == a:
            continue
        with pytest.raises(ValueError):
            ra.release(s)
    ra.release(a)
    with pytest.raises(ValueError):
        ra.release(a)
    assert ra.used == 0


def test_range_allocator_allocate_zero_or_too_many_returns_minus_one():
    ra = RangeAllocator(8)
    assert ra.allocate(0) == -1
    assert ra.allocate(9) == -1
    assert ra.allocate(8) == 0
    assert ra.allocate(1) == -1
    assert ra.used == 8 and ra.largest_free == 0


def test_range_allocator_large_sizes_first_fit():
    n = 100_000
    ra = RangeAllocator(n)
    starts = [ra.allocate(1000) for _ in range(100)]
    assert starts == [i * 1000 for i in range(100)]
    ra.release(5000)
    ra.release(7000)
    assert ra.largest_free == 1000
    assert ra.allocate(1001) == -1
    assert ra.allocate(500) == 5000
    assert ra.allocate(600) == 7000
    assert ra.allocate(500) == 5500


# Single granules take the allocator's bitmap path (a summary level per 64
# words) and leave the segment tree stale until a larger allocation reads it:
# sizes that need one to four bitmap levels, word edges, and long runs of
# single-granule traffic between the larger allocations that bring the tree
# up to date.  largest_free also does, so it is read only now and then.


def _model_fit(free: bytearray, count: int) -> int:
    return free.find(b"\x01" * count) if count else -1


@pytest.mark.parametrize("n", [1, 63, 64, 65, 4095, 4096, 4097, 3 * 4096 + 5, 262_145])
@pytest.mark.parametrize("seed", range(3))
def test_range_allocator_single_granule_path_matches_first_fit_model(n, seed):
    import random
    rnd = random.Random(seed * 1_000_003 + n)
    ra = RangeAllocator(n)
    free = bytearray(b"\x01" * n)
    live: Dict[int, int] = {}
    for step in range(4000):
        r = rnd.random()
        if r < 0.55 or not live:
            # single granules, mostly; sometimes a run of them, to fill whole words
            if r < 0.05:
                count = rnd.choice([2, 3, 64, 65, 200, max(1, n // 3)])
            else:
                count = 1
            for _ in range(rnd.choice([1, 1, 1, 70]) if count == 1 else 1):
                want = _model_fit(free, count)
                got = ra.allocate(count)
                assert got == want, (step, count)
                if got < 0:
                    break
                free[got:got + count] = b"\x00" * count
                live[got] = count
        else:
            # release: mostly the oldest single (FIFO-ish), else any
            starts = list(live)
            start = starts[0] if r < 0.8 else rnd.choice(starts)
            ra.release(start)
            count = live.pop(start)
            free[start:start + count] = b"\x01" * count
        assert ra.used == n - free.count(1)
        if step % 97 == 0:
            assert ra.largest_free == max(map(len, free.split(b"\x00")))
    for start in list(live):
        ra.release(start)
    assert ra.used == 0 and ra.largest_free == n
    assert ra.allocate(n) == 0


def test_range_allocator_singles_fill_every_granule_then_refill_lowest_first():
    n = 4097                                   # three bitmap levels, a lone bit in the last word
    ra = RangeAllocator(n)
    assert [ra.allocate(1) for _ in range(n)] == list(range(n))
    assert ra.allocate(1) == -1 and ra.allocate(2) == -1 and ra.largest_free == 0
    for g in (4096, 64, 63, 4000, 0, 127):
        ra.release(g)
    assert [ra.allocate(1) for _ in range(6)] == [0, 63, 64, 127, 4000, 4096]
    assert ra.allocate(1) == -1
    for g in range(128, 192):                  # a whole word free again
        ra.release(g)
    ra.release(192)
    assert ra.allocate(65) == 128              # the tree sees what singles released
    assert ra.allocate(1) == -1 and ra.used == n
