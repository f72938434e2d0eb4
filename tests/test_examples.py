"""Every code block in README.md, CONTRIBUTING.md and the docs runs as written.

Each fenced ``python`` or ``sh`` block is one test: it runs in a child process
(a crash fails one test) in a fresh temporary directory that holds
``disk.img``, an empty 64 MiB image file, with the venv's ``bin`` first on
PATH (so ``blkio`` and ``python`` are the installed ones).  Python blocks run
with ``-W error``: an unclosed device (ResourceWarning) fails.

A block may be preceded by an HTML comment (invisible on GitHub and in the
built site) that says what it needs::

    <!-- example: vhost-user num-queues=4 -->
    <!-- example: continue -->
    <!-- example: skip (needs an NVMe ZNS namespace) -->
    <!-- example: setup
    import blkio
    dev = blkio.open("io_uring", path="disk.img")
    -->

- ``vhost-user``: qemu-storage-daemon exports ``disk.img`` as vhost-user-blk
  on ``./vhost.sock`` (``num-queues=N``: with N queues; default 1);
- ``root``: needs root (loop devices); skipped otherwise, failed with CI=true;
- ``continue``: the block continues the previous block of the same page (that
  block's code, and its setup, run first in the same process);
- ``setup``: the comment's remaining lines run first (hidden setup for a
  fragment); they may end with ``# teardown`` and lines run after it;
- ``skip (REASON)``: not run, with a reason naming what it needs (hardware,
  root on the host, a released wheel...); the test is reported as skipped.

Blocks in other languages (``text``, ``json``, output listings) are not code
and are not run.  ``sh`` blocks run with ``bash -e``; processes they leave
behind with a pidfile (``--pidfile NAME.pid``) are killed afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List, Optional

import pytest

from conftest import MiB, require, tool_env

REPO = Path(__file__).resolve().parent.parent
RUN_LANGS = {"python": "python", "py": "python", "sh": "sh", "bash": "sh", "shell": "sh"}
DEFAULT_TIMEOUT = 120.0


def documents() -> List[Path]:
    """README.md, CONTRIBUTING.md and every Markdown page of the docs (but
    the generated ones)."""
    docs = sorted(p for p in (REPO / "docs").rglob("*.md")
                  if "_generated" not in p.parts and "_build" not in p.parts)
    return [p for p in (REPO / "README.md", REPO / "CONTRIBUTING.md") if p.exists()] + docs


@dataclasses.dataclass
class Block:
    path: Path
    line: int                       # 1-based line of the opening fence
    lang: str                       # "python" or "sh"
    code: str
    flags: List[str]
    setup: str = ""
    teardown: str = ""
    skip: Optional[str] = None
    previous: Optional["Block"] = None  # for "continue"

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    def flag_value(self, name: str, default: str) -> str:
        for f in self.flags:
            if f.startswith(name + "="):
                return f.split("=", 1)[1]
        return default

    def program(self) -> str:
        """The code to run: the chain of continued blocks, setups first."""
        parts = []
        if self.previous is not None:
            parts.append(self.previous.program_without_teardown())
        parts += [self.setup, self.code, self.teardown]
        return "\n".join(p for p in parts if p)

    def program_without_teardown(self) -> str:
        parts = []
        if self.previous is not None:
            parts.append(self.previous.program_without_teardown())
        parts += [self.setup, self.code]
        return "\n".join(p for p in parts if p)


FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
COMMENT = re.compile(r"<!--\s*example:(?P<body>.*?)-->", re.S)


def parse(path: Path) -> List[Block]:
    """The runnable blocks of one Markdown file, with their comments."""
    text = path.read_text()
    lines = text.splitlines()
    blocks: List[Block] = []
    last_by_lang: dict = {}
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group("fence"), m.group("info").strip()
        start = i
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        lang = info.split()[0].lower() if info else ""
        if lang not in RUN_LANGS:
            continue            # output listings, directives ({toctree} ...), diagrams
        kind = RUN_LANGS[lang]
        # the example comment, if any, ends on the line just before the fence
        before = "\n".join(lines[:start]).rstrip()
        comment = None
        if before.endswith("-->"):
            opening = before.rfind("<!--")
            cm = COMMENT.fullmatch(before[opening:]) if opening >= 0 else None
            if cm:
                comment = cm.group("body")
        flags: List[str] = []
        setup = teardown = ""
        skip = None
        if comment is not None:
            first, _, rest = comment.partition("\n")
            sm = re.search(r"\bskip\s*\((?P<why>.*)\)\s*$", first)
            if sm:
                skip = sm.group("why").strip()
                first = first[:sm.start()]
            flags = first.split()
            if "setup" in flags:
                setup, _, teardown = textwrap.dedent(rest).partition("# teardown")
        block = Block(path, start + 1, kind, textwrap.dedent("\n".join(body)) + "\n", flags,
                      setup.strip("\n"), teardown.strip("\n"), skip)
        if "continue" in flags:
            block.previous = last_by_lang.get(kind)
            if block.previous is None:
                raise ValueError(f"{block.id}: 'continue' with no previous {kind} block")
        last_by_lang[kind] = block
        blocks.append(block)
    return blocks


ALL_BLOCKS = [b for p in documents() for b in parse(p)]


def _kill_pidfiles(where: Path) -> None:
    for pidfile in where.glob("*.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)
        except (ValueError, OSError):
            pass


def run_block(block: Block, cwd: Path) -> subprocess.CompletedProcess:
    env = tool_env()
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    timeout = float(block.flag_value("timeout", str(DEFAULT_TIMEOUT)))
    if block.lang == "python":
        script = cwd / "example.py"
        script.write_text(block.program())
        cmd = [sys.executable, "-W", "error", str(script)]
    else:
        cmd = ["bash", "-e", "-o", "pipefail", "-c", block.program()]
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    finally:
        _kill_pidfiles(cwd)


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[b.id for b in ALL_BLOCKS])
def test_example_runs(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if block.skip is not None:
        pytest.skip(f"{block.id}: {block.skip}")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    chain = [block]
    while chain[-1].previous is not None:
        chain.append(chain[-1].previous)
    if any("root" in b.flags for b in chain):
        require(os.geteuid() == 0, f"{block.id} needs root (it sets up a loop device)")
    if any("vhost-user" in b.flags for b in chain):
        qsd = request.getfixturevalue("qsd")
        queues = max(int(b.flag_value("num-queues", "1")) for b in chain)
        daemon = qsd(num_queues=queues, image=image)
        os.symlink(daemon.socket, tmp_path / "vhost.sock")
    proc = run_block(block, tmp_path)
    assert proc.returncode == 0 and "Exception ignored" not in proc.stderr, (
        f"{block.id} ({block.lang}) failed with exit status {proc.returncode}\n"
        f"--- program ---\n{block.program()}\n--- stdout ---\n{proc.stdout[-3000:]}\n"
        f"--- stderr ---\n{proc.stderr[-3000:]}")


def test_every_page_with_code_has_its_blocks_found() -> None:
    """The parser sees every fenced python/sh block (a fence it missed would
    be a block that is never run)."""
    for path in documents():
        fences = [ln for ln in path.read_text().splitlines()
                  if re.match(r"^\s*(```|~~~)\s*(python|py|sh|bash|shell)\b", ln)]
        assert len(fences) == len(parse(path)), path


def test_skips_say_why() -> None:
    for block in ALL_BLOCKS:
        if block.skip is not None:
            assert len(block.skip) > 10, f"{block.id}: a skip needs a reason"
