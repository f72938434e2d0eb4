"""Child side of the public-surface fuzzer (the parent is tests/test_surface_fuzz.py).

Builds the states a user can reach (a device open, read-only, with zones,
closed; queues live, added, removed, polled; the bounce pool, buffers,
completions and arrays of live and closed devices; AsyncDevice open and
closed; every public class built directly; a loop device with direct=True
and a vhost-user device when the parent passes them), lists the public
attributes of every object found there, and calls each callable with a
hostile argument corpus: one corpus value per parameter, valid values for
the others.  Properties are read, settable ones are set to every value.

Every probe is logged before it runs and again with its outcome, one JSON
line each, the log file opened anew for every line (a probe may close any
fd number): when the process dies or hangs, the last "start" line names the
probe, and the parent starts a new child at the next one (``--start``).
States are built afresh before every probe that may change them.

The contract checked here (tests/test_surface_fuzz.py fails on anything
else): a call returns or raises TypeError, ValueError, OSError (blkio.Error
included), KeyError or IndexError (OverflowError only for an int past
2**64); an integer parameter refuses floats, bools, strings and objects; an
await ends within ASYNC_TIMEOUT; no warning (ResourceWarning, a coroutine
never awaited, a task destroyed while pending, an exception in __del__).

By hand, one probe or a group (the image is a temporary file unless given;
loop and vhost-user groups need --loop-device / --vhost-socket):

    python tests/surface_fuzz.py --list [--group 'open']
    python tests/surface_fuzz.py --only 'open:dev.read(offset=None)'
    python tests/surface_fuzz.py --group 'direct:*'
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import copy
import dataclasses
import enum
import faulthandler
import fnmatch
import gc
import inspect
import json
import logging
import os
import pickle
import re
import sys
import tempfile
import time
import types
import warnings
from typing import Any, Callable, Collection, Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np

import blkio
import blkio.aio

MiB = 1 << 20
IMAGE_SIZE = 1 * MiB
ASYNC_TIMEOUT = 3.0           # an await still pending after this is a hang
ALLOWED = (TypeError, ValueError, OSError, KeyError, IndexError)
HEAPTYPE = 1 << 9             # Py_TPFLAGS_HEAPTYPE: a class defined in Python
REAP_DTYPE = np.dtype([("user_data", np.int64), ("ret", np.int32)])
# A zone geometry for a file device (what open() reads from a ZNS namespace),
# as tests/test_zoned.py gives it, so that zone checks run on the host.
ZONE_GEOMETRY = blkio.ZoneInfo("host-managed", MiB // 16, 16, 4, 4, False, 0)


# ---------------------------------------------------------------------------
# The corpus


@dataclasses.dataclass(frozen=True)
class Value:
    """One argument of the corpus: made afresh for every probe (a probe may
    keep or change it); ``kinds`` says what an integer parameter must refuse."""

    label: str
    make: Callable[["State"], Any]
    kinds: FrozenSet[str] = frozenset()


def _v(label: str, value: Any, *kinds: str) -> Value:
    return Value(label, lambda st: value, frozenset(kinds))


def _m(label: str, make: Callable[["State"], Any], *kinds: str) -> Value:
    return Value(label, make, frozenset(kinds))


def _read_only(st: "State") -> np.ndarray:
    a = st.mem(4096)
    a.flags.writeable = False
    return a


CORPUS: Tuple[Value, ...] = (
    _v("None", None, "none"),
    _v("-1", -1), _v("-4096", -4096), _v("2**63", 2**63),
    _v("2**64", 2**64, "big"), _v("2**64+1", 2**64 + 1, "big"),
    _v("0.0", 0.0, "float"), _v("4096.5", 4096.5, "float"), _v("nan", float("nan"), "float"),
    _v("True", True, "bool"), _v("False", False, "bool"),
    _v("''", "", "str"), _v("'abc'", "abc", "str"), _v("'a\\x00b'", "a\x00b", "str"),
    _m("b'x'", lambda st: b"x", "bytes"), _m("bytearray(1)", lambda st: bytearray(1), "bytes"),
    _m("object()", lambda st: object(), "object"),
    _m("read-only array", _read_only, "array"),
    _m("strided array", lambda st: st.mem(8192)[::2], "array"),
    _m("2-D array", lambda st: st.mem(4096).reshape(64, 64), "array"),
    _m("float64 array", lambda st: st.mem(4096).view(np.float64), "array", "floatarray"),
    _m("int32 array", lambda st: st.mem(4096).view(np.int32), "array"),
    _m("0-size array", lambda st: np.empty(0, np.uint8), "array"),
    _m("[]", lambda st: [], "list"),
    _m("ragged list", lambda st: [[0], [0, 4096]], "list"),
    _m("[True, 4096]", lambda st: [True, 4096], "list", "boolarray"),
    _m("np.array([0.0, 4096.7])", lambda st: np.array([0.0, 4096.7]), "array", "floatarray"),
    _m("np.array([True, False])", lambda st: np.array([True, False]), "array", "boolarray"),
    _m("np.int64(-1)", lambda st: np.int64(-1)),
    _m("np.uint64(2**64-1)", lambda st: np.uint64(2**64 - 1)),
    _m("np.float64(4096.0)", lambda st: np.float64(4096.0), "float"),
    _m("[None, -1, 2**64, 4096.5]", lambda st: [None, -1, 2**64, 4096.5], "list", "big"),
    # Valid ones, so that the code behind the checks runs too.
    _v("0", 0), _v("512", 512), _v("4096", 4096), _m("np.int64(4096)", lambda st: np.int64(4096)),
    _m("aligned array", lambda st: st.mem(4096), "array"),
    _m("unaligned array", lambda st: np.zeros(4097, np.uint8)[1:], "array"),
    _m("[aligned array]", lambda st: [st.mem(4096)], "list"),
    _m("uint64 array [0, 4096]", lambda st: np.array([0, 4096], np.uint64), "array"),
)
SHORT = ("None", "-1", "2**63", "2**64", "np.uint64(2**64-1)", "4096.5", "True", "'abc'", "object()", "read-only array",
         "2-D array", "np.array([0.0, 4096.7])", "[True, 4096]", "0", "4096", "aligned array")
TIERS = {"full": CORPUS, "short": tuple(v for v in CORPUS if v.label in SHORT)}
NO_VALUE = object()


# ---------------------------------------------------------------------------
# Signatures: inspect where it can, the package's own .pyi stubs (checked
# against the compiled modules by tests/test_typing.py) where it cannot.

_STUBS: Dict[str, Dict[Optional[str], Dict[str, Any]]] = {}


def _stub_index(module: str) -> Dict[Optional[str], Dict[str, Any]]:
    """{class name or None: {"defs": {name: FunctionDef}, "setters": {name: annotation}}}."""
    if module in _STUBS:
        return _STUBS[module]
    index: Dict[Optional[str], Dict[str, Any]] = {}
    mod = sys.modules.get(module)
    path = getattr(mod, "__file__", None)
    if path:
        stub = os.path.join(os.path.dirname(path), module.rsplit(".", 1)[-1] + ".pyi")
        if os.path.exists(stub):
            with open(stub) as f:
                tree = ast.parse(f.read())

            def scan(body: List[ast.stmt], key: Optional[str]) -> None:
                entry = index.setdefault(key, {"defs": {}, "setters": {}})
                for node in body:
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        setter = [d for d in node.decorator_list
                                  if isinstance(d, ast.Attribute) and d.attr == "setter"]
                        if setter:
                            arg = node.args.args[1] if len(node.args.args) > 1 else None
                            entry["setters"][node.name] = (ast.unparse(arg.annotation)
                                                           if arg is not None and arg.annotation else "")
                        else:
                            entry["defs"][node.name] = node
                    elif isinstance(node, ast.ClassDef):
                        scan(node.body, node.name)
            scan(tree.body, None)
    _STUBS[module] = index
    return index


def _stub_entry(owner: Any) -> Dict[str, Any]:
    if isinstance(owner, types.ModuleType):
        return _stub_index(owner.__name__).get(None, {"defs": {}, "setters": {}})
    return _stub_index(getattr(owner, "__module__", "") or "").get(
        owner.__name__, {"defs": {}, "setters": {}})


class _StubDefault:
    def __repr__(self) -> str:
        return "..."


def _sig_from_stub(fn: ast.FunctionDef) -> inspect.Signature:
    P = inspect.Parameter
    a = fn.args
    pos = a.posonlyargs + a.args
    defaults: List[Optional[ast.expr]] = [None] * (len(pos) - len(a.defaults)) + list(a.defaults)

    def default(node: Optional[ast.expr]) -> Any:
        if node is None:
            return P.empty
        try:
            return ast.literal_eval(node)
        except ValueError:
            return _StubDefault()

    def ann(arg: ast.arg) -> Any:
        return ast.unparse(arg.annotation) if arg.annotation is not None else P.empty

    params = []
    for i, (arg, d) in enumerate(zip(pos, defaults)):
        if i == 0 and arg.arg in ("self", "cls"):
            continue
        kind = P.POSITIONAL_ONLY if arg in a.posonlyargs else P.POSITIONAL_OR_KEYWORD
        params.append(P(arg.arg, kind, default=default(d), annotation=ann(arg)))
    if a.vararg is not None:
        params.append(P(a.vararg.arg, P.VAR_POSITIONAL))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        params.append(P(arg.arg, P.KEYWORD_ONLY, default=default(d), annotation=ann(arg)))
    if a.kwarg is not None:
        params.append(P(a.kwarg.arg, P.VAR_KEYWORD))
    return inspect.Signature(params)


_SIGNATURES: Dict[Any, inspect.Signature] = {}


def signature_of(fn: Any, owner: Any, name: str) -> inspect.Signature:
    """``fn``'s parameters with annotations (strings), from inspect and the stubs."""
    key = (fn if inspect.isclass(fn) or owner is None else owner, name)
    try:
        return _SIGNATURES[key]
    except (KeyError, TypeError):
        pass
    sig = _signature(fn, owner, name)
    try:
        _SIGNATURES[key] = sig
    except TypeError:
        pass
    return sig


def _signature(fn: Any, owner: Any, name: str) -> inspect.Signature:
    stub_defs = _stub_entry(owner)["defs"] if owner is not None else {}
    if inspect.isclass(fn):
        stub_defs = _stub_entry(fn)["defs"]
        stub = stub_defs.get("__new__") or stub_defs.get("__init__")
    else:
        stub = stub_defs.get(name)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    stub_sig = _sig_from_stub(stub) if stub is not None else None
    if sig is None:
        if stub_sig is not None:
            return stub_sig
        return inspect.Signature([inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL)])
    if stub_sig is not None:
        anns = {p.name: p.annotation for p in stub_sig.parameters.values()}
        sig = sig.replace(parameters=[
            p.replace(annotation=anns.get(p.name, p.annotation)) if p.annotation is p.empty else p
            for p in sig.parameters.values()])
    return sig


def _ann_text(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    if hasattr(annotation, "__forward_arg__"):        # NamedTuple fields under future annotations
        return annotation.__forward_arg__
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))


def param_class(name: str, annotation: Any) -> str:
    """"int" (refuses floats, bools, strings, objects), "intarray" (also
    refuses float and bool arrays) or "" (anything may be right)."""
    text = _ann_text(annotation)
    if re.search(r"NDArray\[np\.u?int64\]", text) and "uint8" not in text:
        return "intarray"
    if text in ("", "Any") and name == "offsets":     # aio's batch calls take Any
        return "intarray"
    words = set(re.findall(r"[A-Za-z_]+", text))
    if words & {"int", "SupportsIndex"} and not words & {"bool", "float", "str", "Any", "object"}:
        return "int"
    return ""


def _optional(param: inspect.Parameter) -> bool:
    text = _ann_text(param.annotation)
    return param.default is None or "None" in text or "Optional" in text


def refuses(pclass: str, param: Optional[inspect.Parameter], value: Value) -> bool:
    """Must a call with ``value`` for this parameter raise?"""
    if not pclass:
        return False
    bad = {"float", "bool", "str", "bytes", "object"}
    if pclass == "intarray":
        bad |= {"floatarray", "boolarray"}
    else:
        bad |= {"list", "array"}
    if "none" in value.kinds and param is not None and not _optional(param):
        return True
    return bool(value.kinds & bad)


# ---------------------------------------------------------------------------
# Valid arguments, by parameter name (else by annotation, else the default)


def _spare_queue(st: "State") -> Any:
    dev = st.mem_device
    return dev.add_queue() if dev is not None and not dev.closed else blkio.Queue()


def _future(st: "State") -> Any:
    fut = st.get_loop().create_future()
    st.futures.append(fut)
    return fut


def _waiter(st: "State") -> Any:
    from blkio._pool import _ThreadWaiter    # the pool's own waiter type (fifo_leave's argument)
    return _ThreadWaiter()


VALID: Dict[str, Callable[["State"], Any]] = {
    "offset": lambda st: 0, "zone_offset": lambda st: 0, "nbytes": lambda st: 4096,
    "length": lambda st: 4096, "index": lambda st: 0, "op": lambda st: 0, "flags": lambda st: 0,
    "buf": lambda st: st.mem(4096), "array": lambda st: st.mem(4096), "data": lambda st: st.mem(4096),
    # Two requests, as many as the two-element arrays of the corpus hold.
    "bufs": lambda st: [st.mem(4096)], "offsets": lambda st: np.array([0, 8192], np.uint64),
    "buffers": lambda st: st.mem(8192).reshape(2, 4096), "out": lambda st: np.zeros(4, REAP_DTYPE),
    "zones": lambda st: np.empty(4, blkio.ZONE_DTYPE), "name": lambda st: "capacity",
    "value": lambda st: 1, "field": lambda st: "max_transfer", "driver": lambda st: "io_uring",
    "path": lambda st: st.cfg["image"],
    "device": lambda st: st.mem_device, "queue": _spare_queue,
    "future": _future, "waiter": _waiter, "handle": lambda st: None, "granule": lambda st: 4096,
    "initial": lambda st: 0, "max_size": lambda st: MiB, "code": lambda st: 5,
    "message": lambda st: "fuzz", "model": lambda st: "none",
}
BY_ANNOTATION = {"int": 0, "bool": False, "str": "x", "float": 1.0, "FrozenSet[str]": frozenset()}


def valid_value(st: "State", param: inspect.Parameter) -> Any:
    if param.name in VALID:
        return VALID[param.name](st)
    text = _ann_text(param.annotation)
    if text in BY_ANNOTATION:
        return BY_ANNOTATION[text]
    if param.default is not param.empty and not isinstance(param.default, _StubDefault):
        return param.default
    return NO_VALUE


# ---------------------------------------------------------------------------
# Probes


@dataclasses.dataclass
class Probe:
    """One call, read, assignment or protocol use on one target of a state."""

    id: str
    target: str                 # the state's label for the object
    attr: Optional[str]         # attribute name (None: the target itself is called)
    kind: str                   # "call", "get", "set", "proto"
    hostile: Optional[str] = None        # parameter getting the corpus value
    value: Optional[Value] = None
    positional: bool = False
    extra: str = ""             # "noargs", "extra", "badkw" for argument-count probes
    check_refusal: bool = True
    set_class: str = ""         # param_class of a settable property's value

    where: str = ""             # "Queue.read": the type and attribute, whatever the state

    @property
    def key(self) -> str:
        """The attribute this probe exercises (the parent skips the rest of
        an attribute's probes after one crashed or hung)."""
        if self.kind == "proto":
            return self.id
        return f"{self.id.split(':', 1)[0]}:{self.target}.{self.attr}/{self.kind}"


OURS = ["blkio"]     # the modules whose objects are probed (--selfcheck adds its own)


def _is_blkio(obj: Any) -> bool:
    mod = getattr(obj, "__module__", None) or ""
    return any(mod == m or mod.startswith(m + ".") for m in OURS)


def _owner(obj: Any, name: str) -> Any:
    if isinstance(obj, types.ModuleType):
        return obj
    for klass in type(obj).__mro__:
        if name in vars(klass):
            return klass
    return None


def public_names(obj: Any) -> List[Tuple[str, str]]:
    """[(name, "callable" | "data")]: the public attributes the package
    defines on ``obj`` (a module: its own functions, classes and data)."""
    out = []
    if isinstance(obj, types.ModuleType):
        exported = set(getattr(obj, "__all__", ()))
        for name, value in sorted(vars(obj).items()):
            if name.startswith("_") or isinstance(value, types.ModuleType):
                continue
            if inspect.isclass(value) or callable(value):
                if _is_blkio(value) or name in exported:
                    out.append((name, "callable"))
            elif name.isupper() or _is_blkio(type(value)) or name in exported:
                out.append((name, "data"))
        missing = exported - {name for name, _ in out}
        if missing:     # lazy names (blkio.aio) come from the module's __getattr__
            out += [(name, "data") for name in sorted(missing)]
        return out
    inst = getattr(obj, "__dict__", None) or {}
    for name in sorted(dir(obj)):
        if name.startswith("_"):
            continue
        if name in inst:
            out.append((name, "callable" if callable(inst[name]) and not _is_blkio(type(inst[name]))
                        and inspect.isroutine(inst[name]) else "data"))
            continue
        owner = _owner(obj, name)
        if owner is None or not _is_blkio(owner):
            continue
        static = vars(owner)[name]
        if isinstance(static, (property, types.GetSetDescriptorType, types.MemberDescriptorType)):
            out.append((name, "data"))
        elif callable(static) or isinstance(static, (staticmethod, classmethod)):
            out.append((name, "callable"))
        else:
            out.append((name, "data"))
    return out


def settable(obj: Any, name: str) -> Tuple[str, str]:
    """("yes" | "check" | "no", setter annotation): "check" is a descriptor
    of the compiled core that the stubs do not declare settable: one probe
    sets None and must get AttributeError."""
    owner = _owner(obj, name)
    if owner is None or isinstance(obj, types.ModuleType):
        return "no", ""
    static = vars(owner).get(name)
    if isinstance(static, property):
        if static.fset is None:
            return "no", ""
        try:
            params = list(inspect.signature(static.fset).parameters.values())
            return "yes", _ann_text(params[1].annotation) if len(params) > 1 else ""
        except (TypeError, ValueError):
            return "yes", ""
    if isinstance(static, (types.GetSetDescriptorType, types.MemberDescriptorType)):
        setters = _stub_entry(owner)["setters"]
        if name in setters:
            return "yes", setters[name]
        return "check", ""
    return "no", ""


READS = ("repr", "pickle", "copy", "deepcopy", "memoryview", "len", "iter")


def _protocols(obj: Any) -> List[str]:
    t = type(obj)
    out = ["repr", "pickle", "copy", "deepcopy"]
    try:
        memoryview(obj).release()
        out += ["memoryview", "write-memory"]
    except TypeError:
        pass
    if hasattr(t, "__len__"):
        out.append("len")
    if hasattr(t, "__iter__"):
        out.append("iter")
    if hasattr(t, "__enter__"):
        out.append("with")
    if hasattr(t, "__aenter__"):
        out.append("async-with")
    if hasattr(t, "__await__"):
        out.append("await")
    return out


def probes_for(group: str, label: str, obj: Any, tier: Sequence[Value], st: "State") -> List[Probe]:
    """Every probe of one target: its protocols, then each public attribute."""
    out: List[Probe] = []
    tname = obj.__name__ if isinstance(obj, types.ModuleType) else type(obj).__qualname__
    if not isinstance(obj, types.ModuleType):
        for proto in _protocols(obj):
            out.append(Probe(f"{group}:{proto}({label})", label, proto, "proto", where=f"{proto}({tname})"))
    if isinstance(obj, np.ndarray):
        return out
    first = len(out)
    for name, what in public_names(obj):
        where = f"{group}:{label}.{name}"
        if what == "data":
            out.append(Probe(where, label, name, "get"))
            how, _ = settable(obj, name)
            if how == "check":
                out.append(Probe(f"{where} = None", label, name, "set", value=CORPUS[0],
                                 check_refusal=False))
            elif how == "yes":
                pclass = param_class("value", settable(obj, name)[1])
                for v in tier:
                    out.append(Probe(f"{where} = {v.label}", label, name, "set", value=v, set_class=pclass))
            continue
        if isinstance(obj, types.ModuleType):
            fn = vars(obj)[name]
            if obj is not blkio and any(fn is x for x in vars(blkio).values()):
                continue        # re-exported: probed as blkio's
        else:
            fn = getattr(obj, name)
        out += call_probes(where, label, name, fn, _owner(obj, name), tier)
    for p in out[first:]:
        p.where = f"{tname}.{p.attr}"
    return out


def call_probes(where: str, label: str, name: Optional[str], fn: Any, owner: Any,
                tier: Sequence[Value]) -> List[Probe]:
    sig = signature_of(fn, owner, name or "")
    params = [p for p in sig.parameters.values() if not p.name.startswith("_")]
    if inspect.isclass(fn) and issubclass(fn, enum.Enum):
        params = params[:1]     # Enum's functional API (names=, module=, ...) is not ours
    P = inspect.Parameter
    records = inspect.isclass(fn) and (issubclass(fn, (enum.Enum, tuple, BaseException))
                                       or dataclasses.is_dataclass(fn))
    if records:      # generated constructors of records, enums, exceptions: a short corpus
        tier = [v for v in tier if v.label in SHORT]
    out = [Probe(f"{where}(<valid>)", label, name, "call")]
    required = [p for p in params if p.default is p.empty and p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)]
    if required:
        out.append(Probe(f"{where}(<no arguments>)", label, name, "call", extra="noargs"))
    if not any(p.kind == P.VAR_POSITIONAL for p in params):
        out.append(Probe(f"{where}(<one positional too many>)", label, name, "call", extra="extra"))
    if not any(p.kind == P.VAR_KEYWORD for p in params):
        out.append(Probe(f"{where}(no_such_keyword=1)", label, name, "call", extra="badkw"))
    for p in params:
        if p.kind == P.VAR_KEYWORD:
            out.append(Probe(f"{where}(no_such_property=1)", label, name, "call", extra="badkw"))
            continue
        values = tier
        if _ann_text(p.annotation) in ("bool", "Any", "object"):
            values = [v for v in tier if v.label in SHORT]    # (almost) anything goes there
        positional = p.kind in (P.POSITIONAL_ONLY, P.VAR_POSITIONAL) or \
            (p.kind == P.POSITIONAL_OR_KEYWORD and p.default is p.empty)
        for v in values:
            shown = f"*[{v.label}]" if p.kind == P.VAR_POSITIONAL else f"{p.name}={v.label}"
            out.append(Probe(f"{where}({shown})", label, name, "call", hostile=p.name, value=v,
                             positional=positional, check_refusal=not records))
    return out


# ---------------------------------------------------------------------------
# States


class BuildError(Exception):
    pass


class State:
    """The objects of one state, built afresh whenever a probe may have
    changed them; owns what it opens (closed in ``teardown``)."""

    def __init__(self, cfg: Dict[str, Any], loops: List[asyncio.AbstractEventLoop]) -> None:
        self.cfg = cfg
        self.loops = loops          # the group's event loop (made once: a new one costs ms)
        self.targets: Dict[str, Any] = {}
        self.devices: List[Any] = []
        self.adevs: List[Any] = []
        self.mem_device: Any = None
        self.in_loop = False        # probes are called inside a coroutine on self.loop
        self.futures: List[Any] = []    # made for probes: their exceptions are retrieved here
        self.settles = False        # its queues are live and driven by nobody else (see settle)

    @property
    def loop(self) -> Optional[asyncio.AbstractEventLoop]:
        return self.loops[0] if self.loops else None

    def get_loop(self) -> asyncio.AbstractEventLoop:
        if not self.loops:
            loop = asyncio.new_event_loop()
            loop.set_exception_handler(_loop_exception)
            self.loops.append(loop)
        return self.loops[0]

    def open(self, driver: str = "io_uring", path: Optional[str] = None, **kw: Any) -> Any:
        dev = blkio.open(driver, path=path or self.cfg["image"], **kw)
        self.devices.append(dev)
        if self.mem_device is None:
            self.mem_device = dev
        return dev

    def mem(self, nbytes: int) -> np.ndarray:
        dev = self.mem_device
        if dev is not None and not dev.closed:
            return dev.alloc(nbytes)
        raw = np.zeros(nbytes + 4096, np.uint8)
        start = (-raw.ctypes.data) % 4096
        return raw[start:start + nbytes]

    def run(self, make: Callable[[], Any]) -> Any:
        """Call ``make`` (inside a coroutine on the loop for in_loop states)
        and await what it returns, bounded by ASYNC_TIMEOUT."""
        if not self.in_loop:
            result = make()
            if inspect.isawaitable(result):
                result = self.await_(result)
            return result

        async def inside() -> Any:
            result = make()
            if inspect.isawaitable(result):
                result = await result
            return result
        return self.await_(inside())

    def await_(self, awaitable: Any) -> Any:
        loop = self.get_loop()
        task = asyncio.ensure_future(awaitable, loop=loop)
        loop.run_until_complete(asyncio.wait({task}, timeout=ASYNC_TIMEOUT))
        if not task.done():
            task.cancel()
            loop.run_until_complete(asyncio.wait({task}, timeout=1.0))
            raise AwaitHang(f"still pending after {ASYNC_TIMEOUT} s")
        return task.result()

    def dispose(self, result: Any) -> None:
        """Close what a probe opened (the fuzzer's own leak otherwise)."""
        if isinstance(result, blkio.aio.AsyncDevice):
            if any(result.device is d for d in self.devices):
                result.detach()
            else:
                self.await_(result.aclose())
        elif isinstance(result, blkio.Device):
            if not any(result is d for d in self.devices):
                result.close()
        elif isinstance(result, (list, tuple)) and len(result) < 16:
            for x in result:
                self.dispose(x)

    def settle(self) -> None:
        """Submit and reap what a probe left queued: a bad request may only
        crash when it reaches libblkio (the probe is charged with it)."""
        if not self.settles:
            return
        for obj in list(self.targets.values()):
            if isinstance(obj, blkio.Queue) and not obj.device.closed and not obj.removed \
                    and obj.in_flight:
                obj.wait(min=obj.in_flight, timeout=1.0)

    def leftover_tasks(self) -> List[str]:
        """Tasks a probe left pending on the loop (cancelled here)."""
        if self.loop is None:
            return []
        self.loop.run_until_complete(asyncio.sleep(0))
        pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
        return [repr(t.get_coro()) for t in pending]

    def teardown(self, final: bool = False) -> None:
        """Close what the state opened; ``final``: the group's loop too."""
        errors = []
        for adev in self.adevs:
            try:
                self.await_(adev.aclose())
            except Exception as e:          # reported by the caller
                errors.append(f"aclose: {type(e).__name__}: {e}")
        for dev in self.devices:
            try:
                dev.close()
            except Exception as e:
                errors.append(f"close: {type(e).__name__}: {e}")
        for fut in self.futures:
            if fut.done() and not fut.cancelled():
                fut.exception()     # retrieved: the probe's own future, not a finding
            else:
                fut.cancel()
        self.futures.clear()
        self.targets.clear()
        self.devices.clear()
        self.adevs.clear()
        self.mem_device = None
        loop = self.loop
        if loop is not None:
            for t in asyncio.all_tasks(loop):
                t.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            if final:
                self.loops.clear()
                try:
                    loop.run_until_complete(loop.shutdown_asyncgens())
                    loop.run_until_complete(loop.shutdown_default_executor())
                finally:
                    loop.close()
        if errors:
            raise BuildError("; ".join(errors))


class AwaitHang(Exception):
    """An await of a probe did not end within ASYNC_TIMEOUT."""


def _walk(st: State, step: Callable[[str], None], exclude: Tuple[type, ...] = ()) -> None:
    """Add the objects of the package's types reachable through the data
    attributes of the targets (one level: limits, stats, zone_info, ...)."""
    seen = {id(o) for o in st.targets.values()}
    for label, obj in list(st.targets.items()):
        if isinstance(obj, (np.ndarray, types.ModuleType)):
            continue
        for name, what in public_names(obj):
            if what != "data":
                continue
            step(f"read {label}.{name}")
            try:
                value = getattr(obj, name)
            except ALLOWED:
                continue
            items = [(f"{label}.{name}", value)]
            if isinstance(value, (tuple, list)):
                items = [(f"{label}.{name}[{i}]", x) for i, x in enumerate(value[:4])]
            for sub, x in items:
                if _is_blkio(type(x)) and id(x) not in seen and not isinstance(x, exclude):
                    seen.add(id(x))
                    st.targets[sub] = x


# Each builder fills st.targets; ``step`` logs what it is about to do (a
# crash while building names the step).

def build_module(st: State, step: Callable[[str], None]) -> None:
    st.open()
    st.in_loop = True
    st.targets.update({"blkio": blkio, "blkio.aio": blkio.aio})


def _open_objects(st: State, dev: Any, step: Callable[[str], None]) -> None:
    st.targets["dev"] = dev
    st.targets["q"] = dev.queue(0)
    step("dev.add_queue()")
    st.targets["added_q"] = dev.add_queue()
    st.targets["pool"] = dev.bounce_pool
    step("register a Buffer")
    buf = blkio.Buffer(4096)
    dev.register(buf)
    st.targets["buffer"] = buf
    step("q.read + q.wait")
    arr = dev.alloc(4096)
    st.targets["q"].read(0, arr, user_data="fuzz")
    st.targets["completion"] = st.targets["q"].wait()[0]
    st.targets["array"] = arr


def build_open(st: State, step: Callable[[str], None]) -> None:
    st.settles = True
    _open_objects(st, st.open(), step)
    _walk(st, step)


def build_read_only(st: State, step: Callable[[str], None]) -> None:
    st.settles = True
    dev = st.open(read_only=True)
    st.targets.update({"dev": dev, "q": dev.queue(0)})


def build_zoned(st: State, step: Callable[[str], None]) -> None:
    st.settles = True
    dev = st.open()
    dev._set_zone_info(ZONE_GEOMETRY)
    st.targets.update({"dev": dev, "q": dev.queue(0)})


def build_closed(st: State, step: Callable[[str], None]) -> None:
    dev = st.open()
    _open_objects(st, dev, step)
    del st.targets["added_q"]       # a queue of a closed device: "q" is one
    step("dev.close()")
    dev.close()


def build_removed(st: State, step: Callable[[str], None]) -> None:
    dev = st.open()
    q = dev.add_queue()
    arr = dev.alloc(4096)
    q.read(0, arr)
    comp = q.wait()[0]
    step("dev.remove_queue(q)")
    dev.remove_queue(q)
    st.targets.update({"removed_q": q, "removed_q_completion": comp})


def _open_async(st: State, step: Callable[[str], None], closed: bool) -> None:
    st.in_loop = True
    step("await blkio.aio.open()")
    adev = st.await_(blkio.aio.open("io_uring", path=st.cfg["image"]))
    st.adevs.append(adev)
    st.devices.append(adev.device)      # closed even when aclose fails
    st.mem_device = adev.device
    st.targets["adev"] = adev
    if not closed:      # the closed one's queue is a queue of a closed device ("closed" group)
        st.targets["adev.queue"] = adev.queue
        # What blkio.aio.open returns before it is awaited (awaitable, async with).
        st.targets["opener"] = blkio.aio.open("io_uring", path=st.cfg["image"])
    if closed:
        step("await adev.aclose()")
        st.await_(adev.aclose())


def build_aio(st: State, step: Callable[[str], None]) -> None:
    _open_async(st, step, closed=False)


def build_aio_closed(st: State, step: Callable[[str], None]) -> None:
    _open_async(st, step, closed=True)


def build_loop(st: State, step: Callable[[str], None]) -> None:
    st.settles = True
    dev = st.open(path=st.cfg["loop"], direct=True)
    st.targets.update({"dev": dev, "q": dev.queue(0), "pool": dev.bounce_pool})
    _walk(st, step)


def build_vhost(st: State, step: Callable[[str], None]) -> None:
    st.settles = True
    step("blkio.open(virtio-blk-vhost-user)")
    dev = st.open("virtio-blk-vhost-user", st.cfg["vhost"], num_queues=1, num_poll_queues=1)
    # The poll queue stands for the queues (its requests take the same paths).
    st.targets.update({"dev": dev, "poll_q": dev.poll_queue(0), "pool": dev.bounce_pool})
    _walk(st, step, exclude=(blkio.Queue,))


def public_classes() -> List[Tuple[str, type]]:
    """Every class reachable as a public name of blkio or blkio.aio."""
    out, seen = [], set()
    for mod in (blkio, blkio.aio):
        for name, what in public_names(mod):
            value = vars(mod)[name]
            if inspect.isclass(value) and value not in seen:
                seen.add(value)
                out.append((f"{mod.__name__}.{name}", value))
    return out


def _construct(st: State, cls: type) -> Any:
    """``cls`` built directly with valid arguments (inside the loop)."""
    sig = signature_of(cls, None, "")
    args: List[Any] = []
    for p in sig.parameters.values():
        if p.name.startswith("_") or p.kind in (p.VAR_KEYWORD,) or p.default is not p.empty:
            continue
        if p.kind == p.VAR_POSITIONAL:
            if issubclass(cls, BaseException):
                args += [5, "fuzz"]
            continue
        v = valid_value(st, p)
        if v is NO_VALUE:
            raise BuildError(f"no valid value for parameter {p.name!r} of {cls.__name__}")
        args.append(v)
    return st.run(lambda: cls(*args))


def direct_builder(cls: Any, bypass_init: bool) -> Callable[[State, Callable[[str], None]], None]:
    def build(st: State, step: Callable[[str], None]) -> None:
        st.open()
        st.in_loop = True
        step(f"{cls.__name__}.__new__({cls.__name__})" if bypass_init else f"{cls.__name__}(...)")
        obj = st.run(lambda: cls.__new__(cls)) if bypass_init else _construct(st, cls)
        if isinstance(obj, blkio.aio.AsyncDevice) and not bypass_init:
            st.adevs.append(obj)
        st.targets[cls.__name__ + "()"] = obj
    return build


class SelfCheck:
    """Methods whose outcomes are known (``--selfcheck``): the parent's own
    test checks that each is reported and that the probes after it run."""

    def aborts(self) -> None:
        os.abort()

    def accepts_floats(self, offset: int) -> int:
        return 0

    def abandons_fds(self) -> None:     # first: before an event loop has fds to lose
        for fd in range(3, 256):        # the log among them: it is reopened for every line
            try:
                os.close(fd)
            except OSError:
                pass

    async def awaits_forever(self) -> None:
        await asyncio.Event().wait()

    def hangs(self) -> None:
        time.sleep(3600)

    def drops_a_coroutine(self) -> None:
        asyncio.sleep(0)        # never awaited: a RuntimeWarning when it is collected

    def leaks(self) -> None:
        warnings.warn("unclosed resource of the self-check", ResourceWarning)

    async def leaves_a_task(self) -> None:
        asyncio.get_running_loop().create_task(asyncio.sleep(3600))

    def raises_runtime_error(self) -> None:
        raise RuntimeError("outside the contract")

    def refuses_floats(self, offset: int) -> int:
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise TypeError(f"offset must be an int, not {type(offset).__name__}")
        return 0


def build_selfcheck(st: State, step: Callable[[str], None]) -> None:
    st.targets["check"] = SelfCheck()


@dataclasses.dataclass
class Group:
    name: str
    build: Callable[[State, Callable[[str], None]], None]
    tier: str = "full"
    needs: Optional[str] = None      # a cfg key that must be set (loop, vhost)
    full: Tuple[str, ...] = ()       # targets that get the group's tier (others: "short")
    position: int = -1               # in groups(): where a new child resumes
    # The state only lends a device to the probes' arguments (module-level
    # calls): rebuilt when that device was closed or a probe went wrong.
    lends_only: bool = False


def groups(cfg: Dict[str, Any]) -> List[Group]:
    """Every group, in a fixed order (a new child resumes by position)."""
    if cfg.get("selfcheck"):
        return [Group("selfcheck", build_selfcheck, "short", position=0)]
    out = [Group("module", build_module, full=("blkio", "blkio.aio"), lends_only=True),
           Group("open", build_open, full=("dev", "q", "pool", "buffer", "completion", "array")),
           # (the added queue: short, it takes the paths of "q")
           Group("read-only", build_read_only, "short"), Group("zoned", build_zoned, "short"),
           Group("closed", build_closed, "short"), Group("removed", build_removed, "short"),
           Group("aio", build_aio, full=("adev",)), Group("aio-closed", build_aio_closed, "short")]
    for qual, cls in public_classes():
        if issubclass(cls, enum.Enum):
            continue        # members are reached as values; the class is called in "module"
        out.append(Group(f"direct:{cls.__name__}", direct_builder(cls, False), "short"))
        if cls.__init__ is not object.__init__ and any(
                _is_blkio(k) and not k.__flags__ & HEAPTYPE for k in cls.__mro__):
            # A Python class over a compiled one (Device): __new__ alone makes
            # the compiled part, whatever __init__ refuses.
            out.append(Group(f"new:{cls.__name__}", direct_builder(cls, True), "short"))
    out += [Group("loop", build_loop, "short", "loop"), Group("vhost", build_vhost, "short", "vhost")]
    out = [g for g in out if g.needs is None or cfg.get(g.needs)]
    for i, g in enumerate(out):
        g.position = i
    return out


# ---------------------------------------------------------------------------
# Running probes


class Log:
    """One JSON line per event, the file opened for every line (a probe may
    have closed any fd); without a path, bad outcomes are printed."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = path

    def __call__(self, **event: Any) -> None:
        if self.path is None:
            if event.get("e") == "end" and event.get("bad"):
                print(f"BAD  {event['id']}: {event['bad']}", flush=True)
            elif event.get("e") in ("warn", "note", "skip"):
                print(f"{event['e'].upper()} {event.get('id', '')}: {event.get('m', '')}", flush=True)
            return
        line = json.dumps(event, default=repr) + "\n"
        with open(self.path, "a") as f:
            f.write(line)


LOG = Log(None)
CURRENT = ["(start-up)"]        # the probe or step warnings are charged to


def _warn_hook(message: Any, category: type, filename: str, lineno: int, file: Any = None,
               line: Any = None) -> None:
    if issubclass(category, (DeprecationWarning, PendingDeprecationWarning)):
        return
    LOG(e="warn", id=CURRENT[0], m=f"{category.__name__}: {message} ({os.path.basename(filename)}:{lineno})")


def _unraisable_hook(u: Any) -> None:
    LOG(e="warn", id=CURRENT[0], m=f"unraisable {type(u.exc_value).__name__} in {u.object!r}: {u.exc_value}")


def _loop_exception(loop: Any, context: Dict[str, Any]) -> None:
    LOG(e="warn", id=CURRENT[0], m=f"event loop: {context.get('message')} {context.get('exception')!r}")


class _AsyncioLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        LOG(e="warn", id=CURRENT[0], m=f"asyncio log: {record.getMessage()[:500]}")


def materialize(st: State, probe: Probe, obj: Any) -> Tuple[Any, List[Any], Dict[str, Any], Optional[inspect.Parameter]]:
    fn = obj if probe.attr is None else (vars(obj)[probe.attr] if isinstance(obj, types.ModuleType)
                                         else getattr(obj, probe.attr))
    sig = signature_of(fn, _owner(obj, probe.attr or ""), probe.attr or "")
    args: List[Any] = []
    kwargs: Dict[str, Any] = {}
    hostile_param = None
    for p in sig.parameters.values():
        if p.name.startswith("_"):
            continue
        if p.name == probe.hostile:
            hostile_param = p
            assert probe.value is not None
            v = probe.value.make(st)
            if p.kind == p.VAR_KEYWORD:
                continue
            if probe.positional:
                args.append(v)
            else:
                kwargs[p.name] = v
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is not p.empty or probe.extra == "noargs":
            continue
        v = valid_value(st, p)
        if v is NO_VALUE:
            raise BuildError(f"the fuzzer has no valid value for parameter {p.name!r} of "
                             f"{probe.id.split('(')[0]}: add one to VALID in tests/surface_fuzz.py")
        if p.kind == p.KEYWORD_ONLY:
            kwargs[p.name] = v
        else:
            args.append(v)
    if probe.extra == "extra":
        args += [0] * (len([p for p in sig.parameters.values()
                            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) - len(args)) + [0]
    elif probe.extra == "badkw":
        kwargs["no_such_property" if "property" in probe.id else "no_such_keyword"] = 1
    return fn, args, kwargs, hostile_param


def _proto(st: State, name: str, obj: Any) -> Any:
    if name == "repr":
        return repr(obj)
    if name == "pickle":
        return pickle.loads(pickle.dumps(obj))
    if name == "copy":
        return copy.copy(obj)
    if name == "deepcopy":
        return copy.deepcopy(obj)
    if name == "memoryview":
        with memoryview(obj) as m:
            return bytes(m)[:16]
    if name == "write-memory":
        with memoryview(obj) as m:
            if m.readonly:
                return None
            m.cast("B")[:] = b"\x5a" * m.nbytes
            return None
    if name == "len":
        return len(obj)
    if name == "iter":
        return list(iter(obj))[:16]
    if name == "with":
        with obj:
            return None
    if name == "async-with":
        async def body() -> None:
            async with obj:
                pass
        return st.await_(body())
    if name == "await":
        result = st.run(lambda: obj)
        st.dispose(result)
        return result
    raise AssertionError(name)


def judge(probe: Probe, exc: Optional[BaseException], param: Optional[inspect.Parameter]) -> Optional[str]:
    """What is wrong with this outcome (None: it keeps the contract)."""
    if exc is None:
        if probe.kind == "call" and probe.value is not None and probe.check_refusal and param is not None:
            pclass = param_class(param.name, param.annotation)
            if refuses(pclass, param, probe.value):
                return f"accepts {_family(probe.value)} for the {pclass} parameter {param.name!r}: {probe.value.label}"
        if probe.kind == "set" and probe.value is not None and probe.check_refusal:
            if refuses(probe.set_class, None, probe.value):
                return f"accepts {_family(probe.value)} for an {probe.set_class} property: {probe.value.label}"
        return None
    if isinstance(exc, AwaitHang):
        return f"hang: await {exc}"
    name = f"{type(exc).__name__}: {_short(exc)}"
    if isinstance(exc, OverflowError) and probe.value is not None and "big" in probe.value.kinds:
        return None
    if isinstance(exc, AttributeError) and probe.kind == "set" and \
            re.search(r"not writable|readonly attribute|can't set|has no setter", str(exc)):
        return None
    if isinstance(exc, ALLOWED):
        return None
    if isinstance(exc, AttributeError) and probe.id.startswith("new:"):
        return None     # __init__ bypassed: the facade's own attributes are missing
    return f"raised {name}"


def _family(value: Value) -> str:
    for kind, family in (("floatarray", "float arrays"), ("boolarray", "bool lists/arrays"),
                         ("float", "floats"), ("bool", "bools"), ("none", "None")):
        if kind in value.kinds:
            return family
    return "non-numbers"


def _short(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= 300 else text[:300] + "..."


_PICKLED: set = set()


def check_error_pickles(exc: BaseException) -> Optional[str]:
    """An exception of ours must round-trip through pickle (errno, message, class)."""
    cls = type(exc)
    if not _is_blkio(cls) or cls in _PICKLED:
        return None
    _PICKLED.add(cls)
    try:
        back = pickle.loads(pickle.dumps(exc))
    except Exception as e:
        return f"{cls.__module__}.{cls.__qualname__} does not pickle: {type(e).__name__}: {_short(e)}"
    if type(back) is not cls or getattr(back, "errno", None) != getattr(exc, "errno", None) \
            or str(back) != str(exc):
        return f"{cls.__module__}.{cls.__qualname__} comes back from pickle as {type(back).__name__}: {back!r}"
    return None


def run_probe(st: State, probe: Probe) -> Tuple[Optional[BaseException], Optional[inspect.Parameter], str]:
    """Run one probe; returns (exception or None, the hostile parameter, a short result)."""
    obj = st.targets[probe.target]
    attr = probe.attr or ""
    param = None
    try:
        if probe.kind == "get":
            result = getattr(obj, attr)
        elif probe.kind == "set":
            assert probe.value is not None
            value = probe.value.make(st)
            result = st.run(lambda: setattr(obj, attr, value))
            st.settle()
        elif probe.kind == "proto":
            result = _proto(st, probe.attr or "", obj)
        else:
            fn, args, kwargs, param = materialize(st, probe, obj)
            result = st.run(lambda: fn(*args, **kwargs))
            st.dispose(result)
            st.settle()
        shown = type(result).__name__
        del result
        return None, param, shown
    except (BuildError, KeyboardInterrupt):
        raise
    except BaseException as e:      # SystemExit, CancelledError, ...: findings too
        return e, param, ""


# ---------------------------------------------------------------------------
# The driver


def enumerate_group(st: State, group: Group) -> List[Probe]:
    main = TIERS[group.tier if group.tier == "short" else st.cfg.get("tier", "full")]
    out: List[Probe] = []
    for label, obj in st.targets.items():
        out += probes_for(group.name, label, obj, main if label in group.full else TIERS["short"], st)
    return out


def build(group: Group, cfg: Dict[str, Any], why: str,
          loops: List[asyncio.AbstractEventLoop]) -> State:
    st = State(cfg, loops)

    def step(what: str) -> None:
        CURRENT[0] = f"{group.name} (building: {what})"
        if why == "enumerate":      # a rebuild logs one step (its crash is the probe's)
            LOG(e="step", g=group.name, gpos=group.position, m=what, why=why)
    if why != "enumerate":
        LOG(e="step", g=group.name, gpos=group.position, m="rebuild", why=why)
    step("open")
    try:
        group.build(st, step)
    except BaseException:
        try:
            st.teardown()
        except BuildError:
            pass
        raise
    CURRENT[0] = f"{group.name} (built)"
    return st


def run(cfg: Dict[str, Any], start: Tuple[int, int], only: Optional[Sequence[str]],
        group_glob: Optional[str], listing: bool, skip: Collection[str] = ()) -> int:
    """Run the probes from ``start`` = (group position, probe index); returns
    the number of bad outcomes."""
    bad = 0
    all_groups = groups(cfg)
    for gpos, group in enumerate(all_groups):
        if gpos < start[0]:
            continue
        if group_glob and not fnmatch.fnmatchcase(group.name, group_glob):
            continue
        if only and not any(o.startswith(group.name + ":") for o in only):
            continue
        loops: List[asyncio.AbstractEventLoop] = []
        try:
            st = build(group, cfg, "enumerate", loops)
            probes = enumerate_group(st, group)
        except Exception as e:
            LOG(e="note", g=group.name, gpos=gpos, id=f"{group.name} (build)",
                m=f"not built: {type(e).__name__}: {_short(e)}")
            st = None
            probes = []
        LOG(e="group", g=group.name, gpos=gpos, n=len(probes), t=round(time.monotonic(), 3))
        if listing:
            for i, p in enumerate(probes):
                print(f"{gpos}:{i}\t{p.id}")
        first = start[1] if gpos == start[0] else 0
        fresh = True
        prev_where = ""
        for i, probe in enumerate(probes):
            if listing or i < first or (only and probe.id not in only):
                continue
            if probe.key in skip:
                LOG(e="skipped", g=group.name, id=probe.id, n=1)
                continue
            try:
                if not fresh or st is None:
                    prev = CURRENT[0]
                    if st is not None:
                        try:
                            st.teardown()
                        except BuildError as e:     # the previous probe's doing
                            LOG(e="end", g=group.name, gpos=gpos, i=i - 1, id=prev, w=prev_where,
                                bad=f"closing its state afterwards failed: {e}", x=None, m="")
                            bad += 1
                    st = None
                    st = build(group, cfg, f"after {prev}", loops)
                CURRENT[0] = probe.id
                prev_where = probe.where
                LOG(e="start", g=group.name, gpos=gpos, i=i, id=probe.id, key=probe.key, w=probe.where)
                t_probe = time.monotonic()
                exc, param, shown = run_probe(st, probe)
                t_probe = time.monotonic() - t_probe
                verdict = judge(probe, exc, param)
                leftover = st.leftover_tasks()
                if leftover and not verdict:
                    verdict = f"left {len(leftover)} task(s) pending: {', '.join(leftover)[:300]}"
                derived = check_error_pickles(exc) if exc is not None and not verdict else None
                if verdict or st.cfg.get("verbose"):
                    LOG(e="end", g=group.name, gpos=gpos, i=i, id=probe.id, bad=verdict, w=probe.where,
                        x=type(exc).__name__ if exc is not None else None,
                        m=_short(exc) if exc is not None else shown, dt=round(t_probe, 4))
                if derived:
                    LOG(e="end", g=group.name, gpos=gpos, i=i, id=f"{probe.id} -> pickle(exception)",
                        bad=derived, x=None, m="", w=f"pickle({type(exc).__name__})")
                bad += bool(verdict) + bool(derived)
                # The next probe gets a fresh state unless this one only read
                # it, or refused its arguments as it should (a refusal that
                # changed the state anyway shows when a crash does not
                # reproduce alone); each attribute starts on a fresh state.
                nxt = probes[i + 1] if i + 1 < len(probes) else None
                same_attr = nxt is not None and (nxt.target, nxt.attr, nxt.kind) == \
                    (probe.target, probe.attr, probe.kind)
                fresh = (probe.kind == "get" or (probe.kind == "proto" and probe.attr in READS)
                         or (exc is not None and not verdict and same_attr)
                         or (group.lends_only and not verdict and not any(d.closed for d in st.devices)))
                del exc
            except BuildError as e:
                LOG(e="end", g=group.name, gpos=gpos, i=i, id=probe.id, bad=f"fuzzer: {e}", x=None, m="")
                bad += 1
                st = None
                fresh = False
        if st is not None:
            try:
                CURRENT[0] = f"{group.name} (teardown)"
                st.teardown(final=True)
            except BuildError as e:
                LOG(e="end", g=group.name, gpos=gpos, i=-1, id=f"{group.name} (teardown)",
                    bad=f"teardown: {e}", x=None, m="")
                bad += 1
        st = None
        for loop in loops:      # left open when a build failed
            loop.close()
        gc.collect()
        CURRENT[0] = "(between groups)"
    LOG(e="done", t=round(time.monotonic(), 3))
    return bad


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", help="a raw file for io_uring states (default: a temporary 1 MiB file)")
    ap.add_argument("--loop-device", help="a loop block device (losetup --direct-io=on)")
    ap.add_argument("--vhost-socket", help="a vhost-user-blk socket (qemu-storage-daemon, num-queues=2)")
    ap.add_argument("--tier", choices=sorted(TIERS), default=os.environ.get("BLKIO_FUZZ_TIER", "full"),
                    help="the corpus of the main groups (others always use 'short')")
    ap.add_argument("--log", help="JSON-lines log (the parent's); without it, bad outcomes are printed")
    ap.add_argument("--start", default="0:0", help="GROUP_POSITION:PROBE_INDEX to start at")
    ap.add_argument("--only", action="append", help="run only this probe id (repeatable)")
    ap.add_argument("--group", help="run only groups matching this glob")
    ap.add_argument("--list", action="store_true", help="list the probes, run nothing")
    ap.add_argument("--skip", action="append", default=[],
                    help="leave out the probes of this attribute key (the parent's, after a crash)")
    ap.add_argument("--verbose", action="store_true", help="log every outcome, not only bad ones")
    ap.add_argument("--selfcheck", action="store_true",
                    help="probe only SelfCheck, whose crash, hang and wrong exception are known")
    args = ap.parse_args(argv)

    global LOG
    LOG = Log(args.log)
    faulthandler.enable()
    warnings.simplefilter("always")
    warnings.showwarning = _warn_hook
    sys.unraisablehook = _unraisable_hook
    alog = logging.getLogger("asyncio")
    alog.addHandler(_AsyncioLog())
    alog.propagate = False

    tmp = None
    image = args.image
    if image is None and not args.selfcheck:
        tmp = tempfile.TemporaryDirectory(prefix="surface-fuzz-")
        image = os.path.join(tmp.name, "image.raw")
        with open(image, "wb") as f:
            f.write(os.urandom(IMAGE_SIZE))
    cfg = {"image": os.path.abspath(image) if image else None, "loop": args.loop_device, "vhost": args.vhost_socket,
           "tier": args.tier, "verbose": args.verbose, "selfcheck": args.selfcheck}
    if args.selfcheck:
        OURS.append(SelfCheck.__module__)
    gpos, _, index = args.start.partition(":")
    t0 = time.monotonic()
    bad = run(cfg, (int(gpos), int(index or 0)), args.only, args.group, args.list, set(args.skip))
    if tmp is not None:
        tmp.cleanup()
    if args.log is not None or args.list:
        return 0        # the parent judges the log
    print(f"{bad} bad outcome(s) in {time.monotonic() - t0:.1f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
