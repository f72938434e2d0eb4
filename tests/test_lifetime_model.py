"""A model of the device lifetime, driven by hypothesis.

Random sequences of open / alloc / register / unregister / blocking I/O /
queue requests / batch requests / wait / close run against a real device
(io_uring over a temporary file, and vhost-user over qemu-storage-daemon),
while a model says what each step must do: succeed, or raise which error.
Data is checked against a shadow copy of the file, so a request that wrote
the wrong memory (or memory freed under it) shows up as a wrong byte.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

import blkio

BS = 4096
NBLOCKS = 64            # the device: 256 KiB
OUT_DTYPE = [("user_data", np.int64), ("ret", np.int32)]

blocks = st.integers(0, NBLOCKS - 1)
patterns = st.integers(1, 255)
mems = st.integers(0, 3)           # small: the same memory comes back often


class LifetimeModel(RuleBasedStateMachine):
    driver = "io_uring"
    props: dict = {}

    @initialize()
    def start(self):
        # Every example starts from the same file contents.
        with open(self.backing, "r+b") as f:
            f.write(self.initial)
            f.flush()
            os.fsync(f.fileno())
        self.dev = None
        self.shadow = bytearray(self.initial)
        self.mems = []              # (array, Buffer or None, registered?)
        self.pending = {}           # user_data -> (kind, block, array) of queue requests
        self.batch = 0              # batch requests not yet reaped
        self.tag = 0
        self.old_queues = []        # queues of closed devices

    # ---- helpers -----------------------------------------------------------

    def _expect_closed(self, call):
        with pytest.raises(ValueError, match="closed"):
            call()

    def _mem(self, i):
        return self.mems[i % len(self.mems)]

    # ---- lifecycle ---------------------------------------------------------

    @precondition(lambda self: self.dev is None)
    @rule()
    def open(self):
        self.dev = blkio.open(self.driver, **self.props)
        self.q = self.dev.queue(0)
        self.mems = []
        self.pending = {}
        self.batch = 0

    @precondition(lambda self: self.dev is not None)
    @rule()
    def close(self):
        q = self.q
        self.dev.close()
        # close drains: queued writes reached the file.
        for kind, block, arr, data in self.pending.values():
            if kind == "write":
                self.shadow[block * BS:(block + 1) * BS] = data
        self.pending = {}
        self.batch = 0
        assert self.dev.closed
        self._expect_closed(lambda: self.dev.readinto(0, np.zeros(BS, np.uint8)))
        self._expect_closed(lambda: q.read(0, np.zeros(BS, np.uint8)))
        self._expect_closed(lambda: q.submit_reads(np.zeros(1, np.uint64),
                                                   np.zeros((1, BS), np.uint8)))
        self._expect_closed(lambda: self.dev.alloc(BS))
        self._expect_closed(lambda: self.dev.get("capacity"))
        # Memory from alloc outlives the device.
        for arr, _, _ in self.mems:
            arr[:1] = arr[:1]
        self.old_queues.append(q)
        self.dev = None

    # ---- memory ------------------------------------------------------------

    @precondition(lambda self: self.dev is not None)
    @rule(n=st.integers(1, 4))
    def alloc(self, n):
        self.mems.append([self.dev.alloc(n * BS), None, False])

    @precondition(lambda self: self.dev is not None)
    @rule(n=st.integers(1, 4))
    def buffer(self, n):
        buf = blkio.Buffer(n * BS)
        self.mems.append([np.frombuffer(buf, np.uint8), buf, False])

    @precondition(lambda self: self.dev is not None and self.mems)
    @rule(i=mems)
    def register(self, i):
        m = self._mem(i)
        if m[1] is None:
            assert self.dev.register(m[0]) is True       # alloc'd: already the device's
            return
        assert self.dev.register(m[0]) is True         # again: a no-op
        m[2] = True

    @precondition(lambda self: self.dev is not None and self.mems)
    @rule(i=mems)
    def unregister(self, i):
        m = self._mem(i)
        lo = m[0].ctypes.data
        hi = lo + m[0].nbytes
        users = sum(1 for _, _, arr, _ in self.pending.values()
                    if arr.ctypes.data < hi and arr.ctypes.data + arr.nbytes > lo)
        if not m[2]:
            assert self.dev.unregister(m[0]) is False
            return
        try:
            assert self.dev.unregister(m[0]) is True
            m[2] = False
        except ValueError as e:
            # Requests not yet completed use it; completed ones (even if not
            # reaped yet) do not.
            n = int(str(e).split(": ")[1].split(" ")[0])
            assert 1 <= n <= users, (e, users)

    # ---- blocking I/O ------------------------------------------------------

    def _busy(self, arr):
        return any(np.shares_memory(a, arr) for _, _, a, _ in self.pending.values())

    def _unsettled(self, block):
        return any(b == block for kind, b, _, _ in self.pending.values() if kind == "write")

    def _race_pending_reads(self, block):
        # A read in flight while a write to its block is submitted may see
        # the old or the new data: the device orders neither (found by
        # hypothesis: an enqueued read, then a blocking write submitting
        # both in one blkioq_do_io).
        for tag, (kind, b, arr, data) in list(self.pending.items()):
            if kind == "read" and b == block:
                self.pending[tag] = (kind, b, arr, "raced")

    @precondition(lambda self: self.dev is not None and self.mems)
    @rule(i=mems, block=blocks, value=patterns)
    def write(self, i, block, value):
        arr = self._mem(i)[0][:BS]
        if self._unsettled(block) or self._busy(arr):
            return
        arr[:] = value
        self._race_pending_reads(block)
        assert self.dev.write(block * BS, arr) == BS
        self.shadow[block * BS:(block + 1) * BS] = bytes(arr)

    @precondition(lambda self: self.dev is not None and self.mems)
    @rule(i=mems, block=blocks)
    def read(self, i, block):
        arr = self._mem(i)[0][:BS]
        if self._busy(arr):
            return          # the device is using that memory now
        assert self.dev.readinto(block * BS, arr) == BS
        if not self._unsettled(block):
            assert bytes(arr) == bytes(self.shadow[block * BS:(block + 1) * BS])

    @precondition(lambda self: self.dev is not None)
    @rule(block=blocks, plain=st.booleans())
    def read_plain(self, block, plain):
        buf = bytearray(BS) if plain else np.zeros(BS, np.uint8)
        self.dev.readinto(block * BS, buf)
        if not self._unsettled(block):
            assert bytes(buf) == bytes(self.shadow[block * BS:(block + 1) * BS])

    # ---- queue and batch ---------------------------------------------------

    @precondition(lambda self: self.dev is not None and self.mems and len(self.pending) < 16)
    @rule(i=mems, block=blocks, value=patterns, write=st.booleans())
    def enqueue(self, i, block, value, write):
        arr = self._mem(i)[0][-BS:]
        if self._busy(arr):
            return
        if write and self._unsettled(block):
            return
        self.tag += 1
        if write:
            arr[:] = value
            self._race_pending_reads(block)
            self.q.write(block * BS, arr, user_data=self.tag)
            self.pending[self.tag] = ("write", block, arr, bytes(arr))
        else:
            self.q.read(block * BS, arr, user_data=self.tag)
            self.pending[self.tag] = ("read", block, arr, None)

    @precondition(lambda self: self.dev is not None and self.pending)
    @rule()
    def wait_all(self):
        done = []
        while len(done) < len(self.pending):
            done += self.q.wait(min=len(self.pending) - len(done), timeout=10)
        reads = []
        for c in done:
            assert c.ret == 0, c
            kind, block, arr, data = self.pending.pop(c.user_data)
            if kind == "write":
                self.shadow[block * BS:(block + 1) * BS] = data
            elif data != "raced":
                reads.append((block, arr))
        for block, arr in reads:
            if not self._unsettled(block):
                assert bytes(arr) == bytes(self.shadow[block * BS:(block + 1) * BS])

    @precondition(lambda self: self.dev is not None and not self.pending and self.batch == 0)
    @rule(n=st.integers(1, 8), first=blocks)
    def batch_read(self, n, first):
        bufs = self.dev.alloc(n * BS).reshape(n, BS)
        offsets = np.array([(first + k) % NBLOCKS * BS for k in range(n)], np.uint64)
        tags = np.iinfo(np.int64).min + np.arange(n, dtype=np.int64)
        self.q.submit_reads(offsets, bufs, user_data=tags)
        out = np.zeros(n, OUT_DTYPE)
        got = 0
        while got < n:
            got += self.q.reap(out[got:], min=1, timeout=10)
        assert (out["ret"] == 0).all()
        assert sorted(out["user_data"].tolist()) == tags.tolist()    # full int64 tags
        for k in range(n):
            b = (first + k) % NBLOCKS
            assert bytes(bufs[k]) == bytes(self.shadow[b * BS:(b + 1) * BS])

    # ---- invariants ----------------------------------------------------------

    @invariant()
    def in_flight_matches_the_model(self):
        if self.dev is not None:
            # Submitted requests may already have completed (collected by
            # another call on the queue, waiting for wait()).
            assert self.q.in_flight <= len(self.pending)

    def teardown(self):
        if getattr(self, "dev", None) is not None:
            self.dev.close()


SETTINGS = settings(max_examples=60, stateful_step_count=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _run(driver, props, img):
    machine = type("Model", (LifetimeModel,), {"driver": driver, "props": props,
                                               "initial": img.data, "backing": img.path})
    machine.TestCase.settings = SETTINGS
    machine.TestCase().runTest()


def test_lifetime_model_io_uring(make_image):
    img = make_image(NBLOCKS * BS)
    _run("io_uring", {"path": str(img.path)}, img)


def test_lifetime_model_vhost_user(make_image, qsd):
    img = make_image(NBLOCKS * BS)
    _run("virtio-blk-vhost-user", {"path": qsd(image=img).socket}, img)
