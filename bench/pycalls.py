"""Count the Python-level calls of a Python program, by function.

    python bench/pycalls.py OUT.json -m blkio bench ARGS...
    python bench/pycalls.py OUT.json SCRIPT.py ARGS...

Runs the module or script in this interpreter with ``sys.setprofile``
counting, in the main thread, every call of a Python function (each resumption
of a coroutine or generator counts as one) and of a builtin (``c_call``), and
writes ``{"module.py:qualname": count}`` to OUT.json when the program ends.
bench/instr.py --py-calls runs it at two sizes and divides the difference by
the requests done: which Python functions a path runs per request, which
callgrind (whose view of Python is ``_PyEval_EvalFrameDefault``) cannot say.
"""

from __future__ import annotations

import collections
import json
import os
import runpy
import sys


def _where(filename: str) -> str:
    for marker in ("site-packages" + os.sep, "python3." + str(sys.version_info[1]) + os.sep):
        i = filename.rfind(marker)
        if i >= 0:
            return filename[i + len(marker):]
    return os.path.basename(filename)


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, target, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    counts: collections.Counter = collections.Counter()
    names: dict = {}

    def prof(frame, event, arg):
        if event == "call":
            code = frame.f_code
            key = names.get(code)
            if key is None:
                key = names[code] = (f"{_where(code.co_filename)}:"
                                     f"{getattr(code, 'co_qualname', code.co_name)}")
            counts[key] += 1
        elif event == "c_call":
            mod = getattr(arg, "__module__", None) or type(getattr(arg, "__self__", None)).__name__
            counts[f"{mod}.{getattr(arg, '__qualname__', arg.__name__)} (C)"] += 1

    if target == "-m":
        module, args = rest[0], rest[1:]
        sys.argv = [module] + args
        run = lambda: runpy.run_module(module, run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        sys.argv = [target] + rest
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        run = lambda: runpy.run_path(target, run_name="__main__")  # noqa: E731
    sys.setprofile(prof)
    try:
        run()
    finally:
        sys.setprofile(None)
        with open(out, "w") as f:
            json.dump(dict(counts), f)


if __name__ == "__main__":
    main()
