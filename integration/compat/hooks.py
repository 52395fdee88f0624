"""e. Who calls the connector's hooks in the release, and with what (a table): the V1
model runner (if it is still there), the V2 runners' ActiveECConnector, the worker and
the scheduler; every call of a hook ECNixlConnector implements must reach ours with
what it needs (its parameters, and the keys it reads from its kwargs)."""

from __future__ import annotations

import ast
from collections import defaultdict

from integration.compat.ours import CONNECTOR, CONNECTOR_CLASS
from integration.compat.report import Section
from integration.compat.source_tree import (
    CallShape,
    Signature,
    SourceTree,
    call_problems,
    kwargs_read,
    methods,
)

WORKER_HOOKS = [
    "start_worker_services",
    "start_save_caches",
    "start_load_caches",
    "save_caches",
    "get_finished",
    "build_connector_worker_meta",
    "no_forward",  # the V2 runners' ECConnector wrapper, on a step with nothing to run
]
SCHEDULER_HOOKS = [
    "has_cache_item",
    "ensure_cache_available",
    "update_state_after_alloc",
    "build_connector_meta",
    "update_connector_output",
    "take_unavailable_requests",
    "request_finished",
]
CONNECTORS = "vllm/distributed/ec_transfer/"  # connectors calling their own parts: skipped
V1_RUNNER = [
    "vllm/v1/worker/gpu_model_runner.py",
    "vllm/v1/worker/cpu_model_runner.py",
    "vllm/v1/worker/ec_connector_model_runner_mixin.py",
]
V2_CONNECTOR = ("vllm.v1.worker.gpu.ec_connector", "ActiveECConnector")


def call_sites(release: SourceTree) -> dict[str, list[tuple[str, CallShape]]]:
    """hook -> (file:line, what it passes), for each call of a hook on an EC connector:
    a receiver named like one (`ec_connector`, `get_ec_transfer()`) or a variable
    assigned from `get_ec_transfer()`."""
    hooks = set(WORKER_HOOKS + SCHEDULER_HOOKS)
    found: list[tuple[str, int, str, CallShape]] = []
    for path in sorted(release.files):
        text = release.files[path]
        if path.startswith(CONNECTORS) or not ("ec_connector" in text or "ec_transfer" in text):
            continue
        if not any(f".{hook}(" in text for hook in hooks):
            continue
        tree = release.parse(path)
        from_getter = {
            target.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign) and "get_ec_transfer()" in ast.unparse(node.value)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in hooks
            ):
                receiver = ast.unparse(node.func.value)
                if (
                    "ec_connector" in receiver
                    or "ec_transfer" in receiver
                    or (receiver in from_getter)
                ):
                    found.append((path, node.lineno, node.func.attr, CallShape.of(node)))
    sites: dict[str, list[tuple[str, CallShape]]] = defaultdict(list)
    for path, line, hook, shape in sorted(found, key=lambda site: site[:2]):
        sites[hook].append((f"{path.removeprefix('vllm/')}:{line}", shape))
    return sites


def _table(rows: tuple[tuple[str, ...], ...]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "".join(f"{cell:<{width}}  " for cell, width in zip(row, widths, strict=False)) + row[-1]
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def check(release: SourceTree, ours: SourceTree) -> Section:
    section = Section("e", "who calls the connector's hooks, and with what")
    connector = next(
        node
        for node in ours.parse(CONNECTOR).body
        if isinstance(node, ast.ClassDef) and node.name == CONNECTOR_CLASS
    )
    ours_methods = {fn.name: fn for fn in methods(connector)}
    sites = call_sites(release)
    rows: list[tuple[str, ...]] = []
    for hook in WORKER_HOOKS + SCHEDULER_HOOKS:
        side = "worker" if hook in WORKER_HOOKS else "scheduler"
        fn = ours_methods.get(hook)
        takes = str(Signature.of(fn)) if fn else "-"
        if fn is not None and kwargs_read(fn):
            takes += " reads " + ", ".join(sorted(kwargs_read(fn)))
        by_shape: dict[CallShape, list[str]] = defaultdict(list)
        for where, shape in sites.get(hook, []):
            by_shape[shape].append(where)
        calls = [(str(shape), ", ".join(wheres)) for shape, wheres in by_shape.items()]
        for index, (shape, wheres) in enumerate(calls or [("(no call)", "")]):
            first = (side, hook, takes) if index == 0 else ("", "", "")
            rows.append((*first, shape, wheres))
    header = ("side", "hook", f"{CONNECTOR_CLASS} takes", "called with", "from")
    section.table += _table((header, *rows))
    for hook in WORKER_HOOKS + SCHEDULER_HOOKS:
        fn = ours_methods.get(hook)
        if fn is None:
            continue
        if not sites.get(hook):
            section.fail(f"nothing calls {hook}: {CONNECTOR_CLASS}.{hook} would never run")
        signature, needs = Signature.of(fn), kwargs_read(fn)
        for where, shape in sites.get(hook, []):
            if problems := call_problems(shape, signature, needs):
                section.fail(f"{where} calls {hook}{shape}: {'; '.join(problems)}")
    section.table.append("")
    v1 = [path.removeprefix("vllm/v1/worker/") for path in V1_RUNNER if path in release.files]
    section.table.append(f"V1 model runner: {'present: ' + ', '.join(v1) if v1 else 'removed'}")
    idle = [where for where, _ in sites.get("no_forward", [])]
    section.table.append(
        "V2 runners reach the connector on a step with nothing to run (no_forward): "
        + (", ".join(idle) if idle else "nowhere")
    )
    active = release.find_class(*V2_CONNECTOR)
    if active is None:
        section.fail(f"{V2_CONNECTOR[0]} has no {V2_CONNECTOR[1]} (the V2 runners' caller)")
    else:
        section.ok(f"the V2 runners' caller, {V2_CONNECTOR[1]} ({release.where(active)}), is there")
    implemented = [hook for hook in WORKER_HOOKS + SCHEDULER_HOOKS if hook in ours_methods]
    if all(f.ok for f in section.findings):
        count = sum(len(sites.get(hook, [])) for hook in implemented)
        section.ok(f"all {count} calls of the {len(implemented)} hooks we implement fit ours")
    return section
