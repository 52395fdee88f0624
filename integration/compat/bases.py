"""a. The vLLM classes `ec_nixl/connector.py` extends (ECConnectorBase first): their
abstract methods are implemented, every method we override takes every call the base's
signature allows (positional or by name), the attributes we use from the base exist,
and our `super()` calls fit."""

from __future__ import annotations

import ast
from collections.abc import Iterator

from integration.compat.ours import CONNECTOR, vllm_imports
from integration.compat.report import Section
from integration.compat.source_tree import (
    CallShape,
    ClassInfo,
    Signature,
    SourceTree,
    call_problems,
    methods,
    override_problems,
)


def check(release: SourceTree, ours: SourceTree) -> Section:
    section = Section("a", f"the vLLM classes {CONNECTOR} extends")
    tree = ours.parse(CONNECTOR)
    imported = vllm_imports(tree)
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for base_expr in node.bases:
            if isinstance(base_expr, ast.Name) and base_expr.id in imported:
                module, name = imported[base_expr.id]
                base = release.find_class(module, name)
                if base is None:
                    section.fail(f"{node.name}: {module} has no class {name} to extend")
                else:
                    _check_subclass(section, release, ClassInfo("ec_nixl.connector", node), base)
    return section


def _check_subclass(section: Section, release: SourceTree, ours: ClassInfo, base: ClassInfo):
    name = f"{ours.name}({base.name})"
    before = len(section.findings)
    mine = ours.own_members()
    abstract = sorted(base.abstract_methods())
    missing = [method for method in abstract if method not in mine]
    for method in missing:
        section.fail(f"{name}: does not implement the abstract {method} ({release.where(base)})")
    if abstract and not missing:
        section.ok(
            f"{name}: implements all {len(abstract)} abstract methods: {', '.join(abstract)}"
        )
    fitting, calls = [], []
    for fn in methods(ours.node):
        if fn.name.startswith("_") and fn.name != "__init__":
            continue
        found = base.method(fn.name)
        if found is None:
            section.fail(f"{name}.{fn.name}: {base.name} has no such method; vLLM never calls it")
            continue
        owner, base_fn = found
        theirs, our_signature = Signature.of(base_fn), Signature.of(fn)
        problems = override_problems(theirs, our_signature)
        if problems:
            section.fail(
                f"{ours.name}.{fn.name}{our_signature} does not fit {owner.name}.{fn.name}"
                f"{theirs} ({release.where(owner, base_fn)}): {'; '.join(problems)}"
            )
        else:
            fitting.append(fn.name)
    for fn, call in _super_calls(ours.node):
        method, shape = call.func.attr, CallShape.of(call)
        found = base.method(method)
        if found is None:
            section.fail(f"{ours.name}.{fn.name} calls super().{method}, which {base.name} lacks")
        elif problems := call_problems(shape, Signature.of(found[1])):
            section.fail(
                f"{ours.name}.{fn.name}: super().{method}{shape} does not fit "
                f"{found[0].name}.{method}{Signature.of(found[1])}: {'; '.join(problems)}"
            )
        else:
            calls.append(f"super().{method}")
    if fitting or calls:
        section.ok(f"{name}: fit the base's signatures: {', '.join(fitting + calls)}")
    inherited = sorted(_self_reads(ours.node) - mine)
    gone = [attribute for attribute in inherited if attribute not in base.members()]
    for attribute in gone:
        section.fail(f"{name} uses self.{attribute}, which {base.name} does not define")
    if inherited and not gone:
        section.ok(f"{name}: uses from the base: {', '.join(inherited)}")
    if len(section.findings) == before:
        section.ok(f"{name}: nothing to implement, override or use ({release.where(base)})")


def _super_calls(node: ast.ClassDef) -> Iterator[tuple[ast.FunctionDef, ast.Call]]:
    for fn in methods(node):
        for call in ast.walk(fn):
            if (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and isinstance(call.func.value, ast.Call)
                and isinstance(call.func.value.func, ast.Name)
                and call.func.value.func.id == "super"
            ):
                yield fn, call


def _self_reads(node: ast.ClassDef) -> set[str]:
    reads = set()
    for fn in methods(node):
        me = fn.args.args[0].arg if fn.args.args else None
        for sub in ast.walk(fn):
            if (
                isinstance(sub, ast.Attribute)
                and isinstance(sub.ctx, ast.Load)
                and isinstance(sub.value, ast.Name)
                and sub.value.id == me
            ):
                reads.add(sub.attr)
    return reads
