"""Signatures with types for the compiled core, read from its ``.pyi`` stubs.

The Cython core is built with ``binding=False`` and clinic-format embedded
signatures: ``inspect.signature`` sees the parameter names and defaults but no
types (builtin methods carry no ``__annotations__``).  The stubs next to the
installed modules (``blkio/_device.pyi`` ...) hold the types, and mypy and
stubtest keep them in step with the code (tests/test_typing.py).  So on
``autodoc-process-signature`` this extension looks the object up in the stub of
the module that defines it and returns the stub's signature, with names
qualified (``SupportsIndex`` -> ``typing.SupportsIndex``, ``np.uint8`` ->
``numpy.uint8``, ``Limits`` -> ``blkio.Limits``) so that Sphinx can
cross-reference them.  Python functions keep their own annotations: the hook
only touches objects that have no ``__annotations__`` of their own.

Why not sphinx-autodoc-typehints: it reads ``__annotations__`` and
``typing.get_type_hints``, which a builtin method does not have; it does not
read stubs.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from sphinx.application import Sphinx

# Private aliases of the stubs, shown as what a reader knows them as.
ALIASES = {
    "_BufferLike": "collections.abc.Buffer",
    "_WritableBufferLike": "collections.abc.Buffer",
    "_U8Array": "numpy.typing.NDArray[numpy.uint8]",
    # batch offsets and tags: any integer array or sequence (a numpy array is one)
    "_Offsets": "collections.abc.Iterable[int]",
    "_DeviceT": "blkio.Device",
}


def _public_name(module: str, name: str) -> str:
    """``blkio._limits.Limits`` -> ``blkio.Limits`` where the package exports
    the same object; otherwise the full name."""
    full = f"{module}.{name}" if module else name
    if module.startswith("blkio._"):
        pkg = sys.modules.get("blkio") or importlib.import_module("blkio")
        try:
            obj = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return full
        if getattr(pkg, name, None) is obj:
            return f"blkio.{name}"
    return full


class _Qualifier(ast.NodeTransformer):
    """Rewrites the names of an annotation into fully qualified ones."""

    def __init__(self, imports: Dict[str, str], local: Dict[str, str]):
        self.imports = imports
        self.local = local

    def visit_Name(self, node: ast.Name) -> Any:
        if node.id in ALIASES:
            return ast.parse(ALIASES[node.id], mode="eval").body
        if node.id in self.local:
            return ast.parse(self.local[node.id], mode="eval").body
        if node.id in self.imports:
            return ast.parse(self.imports[node.id], mode="eval").body
        return node

    def visit_Attribute(self, node: ast.Attribute) -> Any:
        # np.uint8 -> numpy.uint8: only the leftmost name is an import
        node.value = self.visit(node.value)
        return node


class StubModule:
    """The signatures of one ``.pyi`` file, by qualified name."""

    def __init__(self, module: str, path: Path):
        tree = ast.parse(path.read_text(), str(path))
        self.module = module
        imports: Dict[str, str] = {}
        package = module.rpartition(".")[0]
        for node in tree.body:
            if isinstance(node, ast.Import):
                for a in node.names:
                    imports[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = package + ("." + base if base else "")
                for a in node.names:
                    imports[a.asname or a.name] = _public_name(base, a.name)
        # classes defined in this stub are public under blkio where exported
        local = {n.name: _public_name(module, n.name) for n in tree.body if isinstance(n, ast.ClassDef)}
        self.qualify = _Qualifier(imports, local)
        self.sigs: Dict[str, Tuple[str, str]] = {}
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        key = f"{node.name}.{item.name}"
                        if key not in self.sigs:        # the getter, not the setter
                            self.sigs[key] = self._format(item, method=True)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.sigs[node.name] = self._format(node, method=False)

    def _ann(self, node: Optional[ast.expr]) -> str:
        if node is None:
            return ""
        copy = ast.parse(ast.unparse(node), mode="eval").body
        return ast.unparse(self.qualify.visit(copy))

    def _format(self, fn: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> Tuple[str, str]:
        a = fn.args
        parts = []
        positional = a.posonlyargs + a.args
        defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
        for i, (arg, default) in enumerate(zip(positional, defaults)):
            if method and i == 0:
                continue                        # self / cls
            parts.append(self._param(arg, default))
            if a.posonlyargs and arg is a.posonlyargs[-1]:
                parts.append("/")
        if a.vararg:
            parts.append("*" + self._param(a.vararg, None))
        elif a.kwonlyargs:
            parts.append("*")
        for arg, default in zip(a.kwonlyargs, a.kw_defaults):
            parts.append(self._param(arg, default))
        if a.kwarg:
            parts.append("**" + self._param(a.kwarg, None))
        if parts and parts[0] == "/":
            parts.pop(0)
        return "(" + ", ".join(parts) + ")", self._ann(fn.returns)

    def _param(self, arg: ast.arg, default: Optional[ast.expr]) -> str:
        text = arg.arg
        ann = self._ann(arg.annotation)
        if ann:
            text += f": {ann}"
        if default is not None:
            text += (" = " if ann else "=") + ast.unparse(default)
        return text


@functools.lru_cache(maxsize=None)
def stub_for(module: str) -> Optional[StubModule]:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    origin = getattr(mod, "__file__", None)
    if not origin:
        return None
    path = Path(origin).parent / (module.rpartition(".")[2] + ".pyi")
    return StubModule(module, path) if path.exists() else None


def _defining(obj: Any) -> Optional[Tuple[str, str]]:
    """(module, qualified name) of a compiled object, or None for Python code."""
    if inspect.isfunction(obj) or getattr(obj, "__annotations__", None):
        return None
    owner = getattr(obj, "__objclass__", None)
    if owner is not None and (inspect.ismethoddescriptor(obj) or inspect.isdatadescriptor(obj)):
        # a method or getset descriptor of a compiled class
        return owner.__module__, f"{owner.__qualname__}.{obj.__name__}"
    if isinstance(obj, type):
        return obj.__module__, obj.__qualname__
    if inspect.isbuiltin(obj):
        return getattr(obj, "__module__", None) or "", obj.__qualname__
    return None


def stub_signature(obj: Any, what: str) -> Optional[Tuple[str, str]]:
    """(args, return annotation) from the stubs, or None."""
    where = _defining(obj)
    if where is None or not where[0]:
        return None
    stub = stub_for(where[0])
    if stub is None:
        return None
    qualname = where[1]
    if what in ("class", "exception"):
        for ctor in ("__init__", "__new__"):
            if f"{qualname}.{ctor}" in stub.sigs:
                return stub.sigs[f"{qualname}.{ctor}"][0], ""
        return None
    return stub.sigs.get(qualname)


# Return types of Python functions that name a private helper class.
RETURN_ALIASES = {
    "blkio.aio._Opener": "typing.Awaitable[blkio.aio.AsyncDevice] | "
                         "typing.AsyncContextManager[blkio.aio.AsyncDevice]",
}


def process_signature(app: Sphinx, what: str, name: str, obj: Any, options: Any,
                      signature: Optional[str], return_annotation: str) -> Optional[Tuple[str, str]]:
    if what in ("attribute", "property"):
        return None             # typed in add_attribute_types: autodoc has no hook for it
    if what in ("class", "exception"):
        # Sphinx cannot take a signature from this event where it found none
        # (a compiled class): a class users build gets its signature in the
        # page (``.. autoclass:: Buffer(nbytes: int, ...)``); the others
        # (made by blkio, not by users) show none.
        return None
    if return_annotation in RETURN_ALIASES:
        return signature or "()", RETURN_ALIASES[return_annotation]
    found = stub_signature(obj, what)
    if found is None:
        return None
    return found


def _resolve(fullname: str) -> Any:
    """The object a ``blkio.X.y`` name documents, or None."""
    module, _, rest = fullname.partition(".")
    obj: Any = importlib.import_module(module)
    parts = rest.split(".")
    if parts and parts[0] == "aio":
        obj, parts = importlib.import_module("blkio.aio"), parts[1:]
    for part in parts:
        if isinstance(obj, type):
            found = None
            for klass in obj.__mro__:           # the descriptor, not its value
                if part in vars(klass):
                    found = vars(klass)[part]
                    break
            if found is None:
                return None
            obj = found
        else:
            obj = getattr(obj, part, None)
            if obj is None:
                return None
    return obj


def add_attribute_types(app: Sphinx, domain: str, objtype: str, contentnode: Any) -> None:
    """Give a compiled property (a getset descriptor) its type from the stub,
    as ``py:property``'s ``:type:`` option would."""
    if domain != "py" or objtype not in ("attribute", "property"):
        return
    from sphinx import addnodes
    from sphinx.domains.python._annotations import _parse_annotation
    for sig in contentnode.parent.findall(addnodes.desc_signature):
        if any(isinstance(n, addnodes.desc_annotation) and n.astext().startswith(":")
               for n in sig.children):
            continue                            # typed already
        fullname = ".".join(p for p in (sig.get("module"), sig.get("fullname")) if p)
        obj = _resolve(fullname)
        if obj is None:
            continue
        found = stub_signature(obj, "method")
        if found is None or not found[1]:
            continue
        typ = found[1]
        sig += addnodes.desc_annotation(typ, "", addnodes.desc_sig_punctuation("", ":"),
                                        addnodes.desc_sig_space(), *_parse_annotation(typ, app.env))


# Names outside this package: Python's and numpy's inventories cannot be
# fetched here (no network but the package registries), so these are shown
# as their short names, without a link, instead of warning as unresolved.
# Any other unresolved name (ours, misspelt) still fails the build.
_EXTERNAL_MODULES = re.compile(r"^(typing|typing_extensions|collections\.abc|numpy|numpy\.typing|asyncio"
                               r"|enum|os|types|_typeshed|builtins|concurrent\.futures)\."
                               r"|^np\.|^blkio(\.aio)?\._")


def external_reference(app: Sphinx, env: Any, node: Any, contnode: Any) -> Any:
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    if _EXTERNAL_MODULES.match(target) or (
            "." not in target and (hasattr(builtins, target) or hasattr(typing, target))):
        short = target.rpartition(".")[2]
        if "." in target and short in getattr(sys.modules.get("blkio"), "__all__", ()):
            # collections.abc.Buffer is not blkio.Buffer: keep the full name
            from docutils import nodes
            return nodes.Text(target)
        return contnode
    return None


def setup(app: Sphinx) -> Dict[str, Any]:
    app.connect("missing-reference", external_reference)
    app.connect("autodoc-process-signature", process_signature)
    app.connect("object-description-transform", add_attribute_types)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
