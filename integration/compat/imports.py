"""b. Every vLLM name ec_nixl imports (anywhere: in functions, under TYPE_CHECKING) is
defined or re-exported by its module in the release, and our calls to vLLM's functions,
classes and class methods fit their signatures there."""

from __future__ import annotations

import ast
from collections import defaultdict

from integration.compat.ours import is_vllm, vllm_imports
from integration.compat.report import Section
from integration.compat.source_tree import (
    CallShape,
    ClassInfo,
    Signature,
    SourceTree,
    call_problems,
)


def check(release: SourceTree, ours: SourceTree) -> Section:
    section = Section("b", "the vLLM names ec_nixl imports, and its calls to them")
    wanted: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(ours.files):
        for node in ast.walk(ours.parse(path)):
            if isinstance(node, ast.ImportFrom) and not node.level and is_vllm(node.module):
                for alias in node.names:
                    wanted[node.module][alias.name].append(f"{path}:{node.lineno}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if is_vllm(alias.name):
                        wanted[alias.name].setdefault("", []).append(f"{path}:{node.lineno}")
    for module in sorted(wanted):
        names = wanted[module]
        if release.module_path(module) is None:
            where = ", ".join(w for places in names.values() for w in places)
            section.fail(f"{module}: no such module (imported at {where})")
            continue
        missing = [n for n in names if n and release.lookup(module, n) is None]
        for name in missing:
            where = ", ".join(names[name])
            section.fail(f"{module} does not define {name} (imported at {where})")
        if not missing:
            section.ok(f"{module}: {', '.join(n for n in sorted(names) if n) or '(module)'}")
    _check_calls(section, release, ours)
    return section


def _check_calls(section: Section, release: SourceTree, ours: SourceTree) -> None:
    """Our calls to vLLM functions and classes, and to methods of vLLM classes by name
    (`ECConnectorFactory.register_connector(...)`), against their signatures there."""
    fitting = []
    for path in sorted(ours.files):
        tree = ours.parse(path)
        imported = vllm_imports(tree)
        for call in ast.walk(tree):
            if not isinstance(call, ast.Call):
                continue
            target = _callee(release, imported, call.func)
            if target is None:
                continue
            callee, signature = target
            shape = CallShape.of(call)
            if problems := call_problems(shape, signature):
                section.fail(
                    f"{path}:{call.lineno} {callee}{shape} does not fit {callee}{signature}: "
                    + "; ".join(problems)
                )
            elif callee not in fitting:
                fitting.append(callee)
    if fitting:
        section.ok(f"our calls fit: {', '.join(fitting)}")


def _callee(
    release: SourceTree, imported: dict[str, tuple[str, str]], func: ast.expr
) -> tuple[str, Signature] | None:
    attribute = None
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        func, attribute = func.value, func.attr
    if not isinstance(func, ast.Name) or func.id not in imported:
        return None
    found = release.lookup(*imported[func.id])
    if found is None:
        return None  # named by the import check
    if isinstance(found.node, ast.FunctionDef) and attribute is None:
        return func.id, Signature.of(found.node, method=False)
    if not isinstance(found.node, ast.ClassDef):
        return None
    info = release.find_class(*imported[func.id])
    assert info is not None
    if attribute is None and _is_dataclass(info):
        return None  # its __init__ is generated
    method = info.method(attribute or "__init__")
    if method is None:
        return None
    return f"{func.id}.{attribute}" if attribute else func.id, Signature.of(method[1])


def _is_dataclass(info: ClassInfo) -> bool:
    return any(
        isinstance(d, ast.Name | ast.Call | ast.Attribute) and "dataclass" in ast.unparse(d)
        for cls in info.mro()
        for d in cls.node.decorator_list
    )
