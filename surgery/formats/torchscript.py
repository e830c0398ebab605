"""TorchScript archives (``torch.jit.save``): their weights, read without running any of their code.

A TorchScript archive is a torch zip whose ``data.pkl`` pickles ``__torch__.*`` module objects;
each object's state (BUILD) holds its parameters, buffers, submodules and other attributes by name.
Which attributes are parameters and buffers is declared by the class in the archive's
``code/__torch__/...py`` (``__parameters__ = ["weight", "bias", ]``, ``__buffers__ = [...]``): those
files are parsed as text with `ast`, never executed; code Python's parser does not read, a
module class that restores its state with its own ``__setstate__``, and classes torch.jit.load
would refuse are refused. Tensors are named as
``torch.jit.load(f).state_dict()`` names them: per module its parameters, then its buffers (in the
order the object holds them), then each submodule. TorchScript keeps no non-persistent buffers:
every buffer is in its state dict.
"""

from __future__ import annotations

import ast
import pickletools
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import FormatError
from .torch_pickle import Unpickled, unpickle
from .torch_records import TensorRef

MAX_CODE_BYTES = 64 * 1024 * 1024
_MAX_MODULES = 1_000_000


class ScriptObject:
    """An inert record of one ``__torch__`` object: its class name and the state BUILD gave it."""

    qualname = "__torch__.?"
    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


def _identity(value: Any, *_: Any) -> Any:
    return value


# Helpers TorchScript's pickler names for typed containers: each returns its first argument.
_JIT_HELPERS = {("torch.jit._pickle", n): _identity for n in (
    "restore_type_tag", "build_intlist", "build_doublelist", "build_boollist", "build_tensorlist")}


def is_torchscript(names: list[str], prefix: str) -> bool:
    """The archive holds ``constants.pkl``, the record only torch.jit.save writes. torch.load
    decides by this exact name (in its list of records), and so does surgery: an extra
    ``CONSTANTS.PKL`` or ``code/`` entry leaves a torch.save file what torch.load reads."""
    return f"{prefix}constants.pkl" in names


def _script_globals(data: bytes) -> dict[tuple[str, str], type]:
    """A record class for every ``__torch__`` global the pickle names (found by its opcodes)."""
    found: dict[tuple[str, str], type] = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL" and isinstance(arg, str) and arg.startswith("__torch__"):
                module, _, name = arg.partition(" ")
                found[(module, name)] = type(name, (ScriptObject,), {"qualname": f"{module}.{name}"})
    except Exception:  # noqa: BLE001 - a corrupt stream is reported by the unpickler itself
        pass
    return found


@dataclass
class ClassDecl:
    """What a class of the archive's code declares: whether it is a module, its parameters and
    buffers, and whether it restores its state with its own code (``__setstate__``)."""

    module: bool
    params: list[str]
    buffers: list[str]
    setstate: bool = False
    annotations: dict[str, str] = field(default_factory=dict)  # attribute -> its type, as the code writes it


class Declarations:
    """The classes of the archive's code files, as torch's importer reads them."""

    def __init__(self, read: Callable[[str], bytes | None], prefix: str, src: str):
        self.read, self.prefix, self.src = read, prefix, src
        self.files: dict[str, dict[str, ClassDecl]] = {}

    def of(self, qualname: str) -> ClassDecl:
        """The class ``qualname`` names; a class the archive's code does not define is refused
        (torch.jit.load cannot load it either)."""
        module, _, name = qualname.rpartition(".")
        path = f"{self.prefix}code/{module.replace('.', '/')}.py"
        if path not in self.files:
            text = self.read(path)
            if text is None:
                raise FormatError(f"{self.src}: TorchScript archive has no code for class {qualname} ({path}); "
                                  f"the file is incomplete")
            self.files[path] = _parse_classes(text, path, self.src)
        found = self.files[path].get(name)
        if found is None and module.startswith("__torch__.torch.classes"):
            raise FormatError(f"{self.src}: TorchScript archive holds a {qualname[len('__torch__.'):]} object, whose "
                              f"state only its own C++ code reads (a quantized or packed module); surgery runs no code, "
                              f"refusing it")
        if found is None:
            raise FormatError(f"{self.src}: {path} does not define class {name}, which the archive's data uses; "
                              f"the file is incomplete or crafted")
        return found


_LISTS = ("__parameters__", "__buffers__")


def _parse_classes(code: bytes, path: str, src: str) -> dict[str, ClassDecl]:
    """Each class of a code file. torch's importer adds up every assignment of a list where
    Python's last one wins, and treats the lists as optional: a class (or a list) given twice, a
    list in any other form, or code Python's parser does not read is refused rather than read
    one way."""
    try:
        tree = ast.parse(code.decode("utf-8"))
    except (SyntaxError, ValueError, RecursionError, MemoryError, UnicodeDecodeError) as e:
        raise FormatError(f"{src}: {path} is not code surgery can parse ({type(e).__name__}); torch's importer could "
                          f"read declarations from it that surgery would miss, refusing it") from None
    out: dict[str, ClassDecl] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            where = f"{src}: {path}: class {node.name}"
            if node.name in out:
                raise FormatError(f"{where} is defined twice; torch and surgery could read different ones, refusing it")
            out[node.name] = _class_decl(node, where)
    return out


def _class_decl(node: ast.ClassDef, where: str) -> ClassDecl:
    lists: dict[str, list[str]] = {}
    setstate = False
    annotations = _annotations(node)
    for stmt in node.body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name == "__setstate__":
            setstate = True
        target = _list_target(stmt, where)
        if target is None:
            continue
        if target in lists:
            raise FormatError(f"{where} assigns {target} twice; torch.jit.load reads both, refusing it")
        lists[target] = _string_list(stmt.value, where)  # type: ignore[attr-defined]
    module = any((b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else "") == "Module"
                 for b in node.bases)
    params, buffers = lists.get("__parameters__", []), lists.get("__buffers__", [])
    if lists and not module:
        raise FormatError(f"{where} declares {' and '.join(lists)} but is not a Module; torch.jit.load refuses it")
    both = sorted(set(params) & set(buffers))
    if both:
        raise FormatError(f"{where} declares {both[0]!r} both a parameter and a buffer; torch.jit.load refuses it")
    untyped = [n for n in params + buffers if n not in annotations]
    if untyped:
        raise FormatError(f"{where} declares {untyped[0]!r} without giving its type; torch.jit.load refuses it")
    return ClassDecl(module, params, buffers, setstate, annotations)


def _annotations(node: ast.ClassDef) -> dict[str, str]:
    """Each attribute's type as the class writes it: ``name : T`` or ``__annotations__["name"] = T``."""
    out: dict[str, str] = {}
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            out[stmt.target.id] = ast.unparse(stmt.annotation)
        elif (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Subscript)
              and isinstance(stmt.targets[0].value, ast.Name) and stmt.targets[0].value.id == "__annotations__"
              and isinstance(stmt.targets[0].slice, ast.Constant) and isinstance(stmt.targets[0].slice.value, str)):
            out[stmt.targets[0].slice.value] = ast.unparse(stmt.value)
    return out


def _list_target(stmt: ast.stmt, where: str) -> str | None:
    """``__parameters__`` or ``__buffers__`` for a plain ``NAME = [...]`` of one of them, None for a
    statement naming neither; any other statement naming one (annotated, augmented, unpacked) is refused."""
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id if stmt.targets[0].id in _LISTS else None
    if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        named = {n.id for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target])
                 for n in ast.walk(t) if isinstance(n, ast.Name)}
        hit = sorted(named & set(_LISTS))
        if hit:
            raise FormatError(f"{where} assigns {hit[0]} in a form torch's importer and surgery could read differently, "
                              f"refusing it")
    return None


def _string_list(node: ast.AST, where: str) -> list[str]:
    if not (isinstance(node, (ast.List, ast.Tuple)) and all(isinstance(e, ast.Constant) and isinstance(e.value, str)
                                                            for e in node.elts)):
        raise FormatError(f"{where} declares its parameters or buffers as something other than a list of names")
    for e in node.elts:
        # a name written as itself in quotes: "\x63", u"c", r"c", "a" "b" or triple quotes are
        # Python's strings but not TorchScript's, so torch refuses a file surgery would read
        if not (_NAME.fullmatch(e.value) and e.lineno == e.end_lineno  # type: ignore[attr-defined]
                and e.end_col_offset - e.col_offset == len(e.value.encode()) + 2):  # type: ignore[attr-defined,operator]
            raise FormatError(f"{where} declares a parameter or buffer name in a form TorchScript does not write "
                              f"({e.value[:40]!r}, not a plain quoted name); torch.jit.load refuses it, and so does surgery")
    return [e.value for e in node.elts]  # type: ignore[attr-defined]


_NAME = re.compile(r"[^\"'\\\x00-\x1f\x7f]+")  # no quote, backslash or control character: nothing to escape


def read_torchscript(data: bytes, src: str, accept: frozenset[str], decl: Declarations) -> Unpickled:
    """Unpickle ``data.pkl`` with inert records for the ``__torch__`` classes; its object becomes
    the flat state dict ``torch.jit.load(f).state_dict()`` would return."""
    up = unpickle(data, src, accept, extra={**_JIT_HELPERS, **_script_globals(data)})
    root = up.obj
    if not isinstance(root, ScriptObject):
        raise FormatError(f"{src}: TorchScript archive does not hold a module (its data.pkl holds {type(root).__name__})")
    up.obj = _state_dict(root, decl, src)
    return up


def _state_dict(root: ScriptObject, decl: Declarations, src: str) -> dict[str, TensorRef]:
    out: dict[str, TensorRef] = {}
    stack: list[tuple[str, ScriptObject]] = [("", root)]
    seen: set[int] = set()
    while stack:
        prefix, obj = stack.pop()
        if id(obj) in seen or len(seen) >= _MAX_MODULES:
            continue
        seen.add(id(obj))
        cls = decl.of(obj.qualname)
        if not cls.module:
            continue  # a TorchScript class that is not a module: none of its tensors is in a state dict
        if cls.setstate or not isinstance(obj.state, dict):
            raise FormatError(f"{src}: TorchScript module {obj.qualname} restores its state with its own code "
                              f"(__setstate__); which tensors it ends up with only running that code can tell, "
                              f"and surgery runs none, refusing it")
        missing = [n for n in cls.params + cls.buffers if n not in obj.state]
        if missing:
            raise FormatError(f"{src}: TorchScript module {obj.qualname} declares {missing[0]!r}, which its data does not "
                              f"hold; torch.jit.load refuses such an archive")
        for names in (set(cls.params), set(cls.buffers)):
            for k, v in obj.state.items():
                if k in names and isinstance(v, TensorRef):
                    out[prefix + k] = v
        children = [(k, v) for k, v in obj.state.items() if isinstance(v, ScriptObject) and decl.of(v.qualname).module]
        untyped = [k for k, _ in children if cls.annotations.get(k, "Any") == "Any"]
        if untyped:
            raise FormatError(f"{src}: TorchScript module {obj.qualname} holds submodule {untyped[0]!r} without its module "
                              f"type; torch.jit.load refuses it")
        stack.extend((f"{prefix}{k}.", v) for k, v in reversed(children))
    return out


__all__ = ["is_torchscript", "read_torchscript", "ClassDecl", "Declarations", "ScriptObject"]
