"""asyncio front: see blkio.aio.open."""
