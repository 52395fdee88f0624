"""What a tree of Python sources defines, read with `ast` and never imported.

The compatibility check asks a vLLM release's sources the
questions an import or a call would ask at run time (does this module define or
re-export that name; what are this class's members, through its bases; which
calls would this signature accept), so that releases that cannot be installed
here (CUDA-only builds) are checked all the same. ec_nixl's own sources are read
the same way, so the check does not need any vLLM to be importable.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path


class SourceTree:
    """Python files by path below the tree's root (`vllm/config/model.py` -> source)."""

    def __init__(self, files: Mapping[str, str], label: str) -> None:
        self.files = files
        self.label = label
        self._parsed: dict[str, ast.Module] = {}

    @classmethod
    def from_directory(cls, root: Path, package: str, label: str = "") -> SourceTree:
        """The `.py` files of `root/package`."""
        files = {
            path.relative_to(root).as_posix(): path.read_text(encoding="utf-8")
            for path in sorted((root / package).rglob("*.py"))
        }
        return cls(files, label or str(root))

    def module_path(self, module: str) -> str | None:
        """The file of a dotted module name: `a/b.py` or the package's `a/b/__init__.py`."""
        stem = module.replace(".", "/")
        for path in (f"{stem}.py", f"{stem}/__init__.py"):
            if path in self.files:
                return path
        return None

    def parse(self, path: str) -> ast.Module:
        if path not in self._parsed:
            self._parsed[path] = ast.parse(self.files[path], filename=path)
        return self._parsed[path]

    def lookup(self, module: str, name: str) -> Definition | None:
        """Where `from module import name` would find `name`, following re-exports
        (`from x import name`, `from x import *`), a module `__getattr__` that serves it
        lazily, and submodules; None where the import would fail."""
        return self._lookup(module, name, set())

    def _lookup(self, module: str, name: str, seen: set[tuple[str, str]]) -> Definition | None:
        path = self.module_path(module)
        if path is None or (module, name) in seen:
            return None
        seen.add((module, name))
        tree = self.parse(path)
        stars: list[str] = []
        declared = False
        for stmt in top_level(tree.body):
            if isinstance(stmt, ast.ImportFrom):
                source = absolute_module(module, path, stmt)
                for alias in stmt.names:
                    if alias.name == "*":
                        stars.append(source)
                    elif (alias.asname or alias.name) == name:
                        return self._follow(source, alias.name, module, stmt, seen)
            elif name in bound_names(stmt):
                if isinstance(stmt, ast.AnnAssign) and stmt.value is None:
                    declared = True  # a bare annotation: defined only if served lazily
                    continue
                return Definition(module, stmt)
        for source in stars:
            if source.split(".")[0] != module.split(".")[0]:
                continue  # a star import from another distribution: not ours to judge
            exports = self._star_exports(source)
            exported = name in exports if exports is not None else not name.startswith("_")
            if exported and (found := self._lookup(source, name, seen)):
                return found
        getattr_fn = next(
            (
                stmt
                for stmt in top_level(tree.body)
                if isinstance(stmt, ast.FunctionDef) and stmt.name == "__getattr__"
            ),
            None,
        )
        if getattr_fn is not None and (declared or _mentions(getattr_fn, name)):
            return Definition(module, getattr_fn)
        if self.module_path(f"{module}.{name}"):
            return Definition(f"{module}.{name}", None)
        return None

    def _follow(
        self,
        source: str,
        name: str,
        module: str,
        stmt: ast.ImportFrom,
        seen: set[tuple[str, str]],
    ) -> Definition | None:
        if source.split(".")[0] != module.split(".")[0]:
            return Definition(module, stmt)  # re-exported from another distribution
        return self._lookup(source, name, seen)

    def _star_exports(self, module: str) -> set[str] | None:
        """The names `from module import *` brings when the module lists them in
        `__all__`; None for every public name."""
        path = self.module_path(module)
        for stmt in top_level(self.parse(path).body) if path else ():
            if isinstance(stmt, ast.Assign) and "__all__" in bound_names(stmt):
                try:
                    return set(ast.literal_eval(stmt.value))
                except ValueError:
                    return None
        return None

    def where(self, info: ClassInfo, node: ast.AST | None = None) -> str:
        """`path:line` of a class, or of a node in its module."""
        return f"{self.module_path(info.module)}:{(node or info.node).lineno}"

    def find_class(self, module: str, name: str) -> ClassInfo | None:
        """The class `from module import name` would give, with the bases defined in this
        tree (bases from elsewhere, such as `abc.ABC`, are left out)."""
        found = self.lookup(module, name)
        if found is None or not isinstance(found.node, ast.ClassDef):
            return None
        bases = []
        for base in found.node.bases:
            base_name = base.value if isinstance(base, ast.Subscript) else base
            if isinstance(base_name, ast.Name) and (
                info := self.find_class(found.module, base_name.id)
            ):
                bases.append(info)
        return ClassInfo(found.module, found.node, bases)


def _mentions(node: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Constant) and n.value == name for n in ast.walk(node))


@dataclass
class Definition:
    module: str
    node: ast.stmt | None  # None: `name` is a submodule


@dataclass
class ClassInfo:
    module: str
    node: ast.ClassDef
    bases: list[ClassInfo] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.node.name

    def mro(self) -> list[ClassInfo]:
        """This class, then its bases depth first, each once."""
        order: list[ClassInfo] = []
        for info in [self, *(c for base in self.bases for c in base.mro())]:
            if all(info.node is not known.node for known in order):
                order.append(info)
        return order

    def own_members(self) -> set[str]:
        """Names the class body binds, and attributes its methods assign on `self`."""
        members: set[str] = set()
        for stmt in self.node.body:
            members |= bound_names(stmt)
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                members |= self_assignments(stmt)
        return members

    def members(self) -> set[str]:
        return set().union(*(info.own_members() for info in self.mro()))

    def method(self, name: str) -> tuple[ClassInfo, ast.FunctionDef] | None:
        """The nearest definition of method `name`, and the class it is in."""
        for info in self.mro():
            for stmt in info.node.body:
                if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef) and stmt.name == name:
                    return info, stmt
        return None

    def abstract_methods(self) -> set[str]:
        """Abstract methods left for a subclass to implement."""
        abstract: set[str] = set()
        for info in reversed(self.mro()):
            for stmt in info.node.body:
                if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                    if "abstractmethod" in decorator_names(stmt):
                        abstract.add(stmt.name)
                    else:
                        abstract.discard(stmt.name)
        return abstract


def methods(node: ast.ClassDef) -> list[ast.FunctionDef]:
    """The methods a class body defines."""
    return [stmt for stmt in node.body if isinstance(stmt, ast.FunctionDef)]


def top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements a module runs, inside `if`, `try` and `with` blocks too (optional
    imports), but not inside functions, classes or `if TYPE_CHECKING:` (which binds
    nothing at run time)."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, ast.If):
            if not _is_type_checking(stmt.test):
                yield from top_level(stmt.body)
            yield from top_level(stmt.orelse)
        elif isinstance(stmt, ast.With):
            yield from top_level(stmt.body)
        elif isinstance(stmt, ast.Try):
            for block in (stmt.body, stmt.orelse, stmt.finalbody):
                yield from top_level(block)
            for handler in stmt.handlers:
                yield from top_level(handler.body)


def _is_type_checking(test: ast.expr) -> bool:
    name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", None)
    return name == "TYPE_CHECKING"


def bound_names(stmt: ast.stmt) -> set[str]:
    """The names a statement binds in its scope."""
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {stmt.name}
    if isinstance(stmt, ast.Assign):
        return {n.id for target in stmt.targets for n in ast.walk(target) if _stored(n)}
    if isinstance(stmt, ast.AnnAssign | ast.AugAssign) and isinstance(stmt.target, ast.Name):
        return {stmt.target.id}
    if isinstance(stmt, ast.Import):
        return {alias.asname or alias.name.split(".")[0] for alias in stmt.names}
    if isinstance(stmt, ast.ImportFrom):
        return {alias.asname or alias.name for alias in stmt.names if alias.name != "*"}
    return set()


def _stored(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)


def self_assignments(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Attributes a method assigns on its first parameter (`self.x = ...`)."""
    if not fn.args.args:
        return set()
    me = fn.args.args[0].arg
    return {
        node.attr
        for node in ast.walk(fn)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == me
    }


def decorator_names(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    names = set()
    for decorator in fn.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Name):
            names.add(target.id)
        elif isinstance(target, ast.Attribute):
            names.add(target.attr)
    return names


def absolute_module(module: str, path: str, stmt: ast.ImportFrom) -> str:
    """The module an import statement in `module` (at `path`) names, relative ones resolved."""
    if not stmt.level:
        return stmt.module or ""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for _ in range(stmt.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{stmt.module}" if stmt.module else package


# ---- signatures ------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "positional" (positional only), "either" or "keyword" (keyword only)
    default: bool


@dataclass(frozen=True)
class Signature:
    params: tuple[Param, ...]
    varargs: bool
    varkw: bool
    kind: str  # "method", "classmethod", "staticmethod", "property" or "function"

    @classmethod
    def of(cls, fn: ast.FunctionDef | ast.AsyncFunctionDef, method: bool = True) -> Signature:
        """The signature callers see: without `self` or `cls` for a method."""
        decorators = decorator_names(fn)
        kind = "function"
        if method:
            kind = next(
                (k for k in ("classmethod", "staticmethod", "property") if k in decorators),
                "method",
            )
        args = fn.args
        positional = [*args.posonlyargs, *args.args]
        defaults = [False] * (len(positional) - len(args.defaults)) + [True] * len(args.defaults)
        params = [
            Param(arg.arg, "positional" if i < len(args.posonlyargs) else "either", default)
            for i, (arg, default) in enumerate(zip(positional, defaults, strict=True))
        ]
        params += [
            Param(arg.arg, "keyword", default is not None)
            for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True)
        ]
        if kind in ("method", "classmethod", "property") and positional:
            params = params[1:]
        return cls(tuple(params), args.vararg is not None, args.kwarg is not None, kind)

    @property
    def positional(self) -> list[Param]:
        return [p for p in self.params if p.kind != "keyword"]

    def by_name(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name and p.kind != "positional"), None)

    def __str__(self) -> str:
        parts = [p.name + ("=..." if p.default else "") for p in self.positional]
        if any(p.kind == "positional" for p in self.params):
            parts.insert(sum(p.kind == "positional" for p in self.params), "/")
        keywords = [
            p.name + ("=..." if p.default else "") for p in self.params if p.kind == "keyword"
        ]
        if self.varargs:
            parts.append("*args")
        elif keywords:
            parts.append("*")
        parts += keywords
        if self.varkw:
            parts.append("**kwargs")
        return f"({', '.join(parts)})"


def override_problems(base: Signature, ours: Signature) -> list[str]:
    """Why a call that fits the base's signature could fail on ours (empty: none)."""
    problems = []
    if base.kind != ours.kind:
        problems.append(f"the base's is a {base.kind}, ours a {ours.kind}")
    ours_positional = ours.positional
    for index, param in enumerate(base.positional):
        mine = ours_positional[index] if index < len(ours_positional) else None
        if mine is None:
            if not ours.varargs or (param.kind == "either" and not ours.varkw):
                problems.append(f"takes no parameter {index + 1} ({param.name!r} in the base's)")
        elif param.kind == "either" and (mine.name != param.name or mine.kind != "either"):
            problems.append(
                f"parameter {index + 1} is {mine.name!r} where the base's is {param.name!r}, "
                "so a call by name misses it"
            )
        elif param.default and not mine.default:
            problems.append(f"{param.name!r} is optional in the base's, required in ours")
    for param in base.params:
        if param.kind != "keyword":
            continue
        mine = ours.by_name(param.name)
        if mine is None and not ours.varkw:
            problems.append(f"does not take keyword {param.name!r}")
        elif mine is not None and param.default and not mine.default:
            problems.append(f"{param.name!r} is optional in the base's, required in ours")
    if base.varargs and not ours.varargs:
        problems.append("does not take *args, which the base's does")
    if base.varkw and not ours.varkw:
        problems.append("does not take **kwargs, which the base's does")
    matched = {p.name for p in base.params} | {
        p.name for p in ours_positional[: len(base.positional)]
    }
    for param in ours.params:
        if param.name not in matched and not param.default:
            problems.append(f"requires {param.name!r}, which the base's callers do not pass")
    return problems


@dataclass(frozen=True)
class CallShape:
    """What a call site passes: how many positional arguments, which keywords, and
    whether it spreads `*args` or `**kwargs` (whose contents are unknown)."""

    positional: int
    keywords: tuple[str, ...]
    star: bool = False
    double_star: bool = False

    @classmethod
    def of(cls, call: ast.Call) -> CallShape:
        return cls(
            sum(not isinstance(a, ast.Starred) for a in call.args),
            tuple(k.arg for k in call.keywords if k.arg is not None),
            any(isinstance(a, ast.Starred) for a in call.args),
            any(k.arg is None for k in call.keywords),
        )

    def __str__(self) -> str:
        parts = ["<arg>"] * self.positional + [f"{k}=" for k in self.keywords]
        parts += ["*..."] * self.star + ["**..."] * self.double_star
        return f"({', '.join(parts)})"


def call_problems(call: CallShape, ours: Signature, needs: set[str] = frozenset()) -> list[str]:
    """Why `call` would fail on `ours`, or leave out a keyword `needs` names (empty: none)."""
    problems = []
    positional = ours.positional
    if call.positional > len(positional) and not ours.varargs:
        problems.append(
            f"passes {call.positional} positional arguments, ours takes {len(positional)}"
        )
    bound = {p.name for p in positional[: call.positional]}
    for keyword in call.keywords:
        if keyword in bound:
            problems.append(f"passes {keyword!r} twice")
        elif ours.by_name(keyword) is None and not ours.varkw:
            problems.append(f"passes {keyword}=, which ours does not take")
    given = bound | set(call.keywords)
    spread = call.star or call.double_star
    for param in ours.params:
        if not param.default and param.name not in given and not spread:
            problems.append(f"does not pass {param.name!r}")
    for name in sorted(needs - given):
        if not call.double_star:
            problems.append(f"does not pass {name}=, which ours reads from its kwargs")
    if call.star and not ours.varargs and len(positional) <= call.positional:
        problems.append("spreads *args, which ours does not take")
    if call.double_star and not ours.varkw:
        problems.append("spreads **kwargs, which ours does not take")
    return problems


def kwargs_read(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Keys a function reads from its `**kwargs` (`kwargs.get("k")`, `kwargs["k"]`)."""
    if fn.args.kwarg is None:
        return set()
    name = fn.args.kwarg.arg
    keys = set()
    for node in ast.walk(fn):
        target = None
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "pop")
            and node.args
        ):
            owner, target = node.func.value, node.args[0]
        elif isinstance(node, ast.Subscript):
            owner, target = node.value, node.slice
        if (
            target is not None
            and isinstance(owner, ast.Name)
            and owner.id == name
            and isinstance(target, ast.Constant)
            and isinstance(target.value, str)
        ):
            keys.add(target.value)
    return keys
