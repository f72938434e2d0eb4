"""``python -m blkio ARGS`` with blkio.aio's time slice for batches that
complete during submission switched off.

    python bench/no_sync_yield.py bench --api=asyncio-batch ...

``AsyncDevice.read_batch`` returns at once when a batch completes while it
is submitted (page-cached reads do), and lets the event loop run once a
millisecond of wall time (``blkio.aio._SYNC_SLICE``) so that such a loop
cannot starve other tasks. Natively a millisecond is some fifty batches;
under callgrind it is about one, and how many it is follows the machine's
load: the instruction count of the asyncio batch path then moves with the
wall clock (0.8% between two identical runs, more between a busy and an idle
machine). bench/instr.py counts that path through this runner, which sets
the slice to infinity: every batch costs what it costs when it completes
during submission, and the count no longer depends on time.
"""

import runpy
import sys

import blkio.aio

if not hasattr(blkio.aio, "_SYNC_SLICE"):
    sys.exit("bench/no_sync_yield.py: blkio.aio has no _SYNC_SLICE any more; "
             "bench/instr.py's asyncio batch row needs another way to keep "
             "the wall clock out of its count")
blkio.aio._SYNC_SLICE = float("inf")
runpy.run_module("blkio", run_name="__main__", alter_sys=True)
