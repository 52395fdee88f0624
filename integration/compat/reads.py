"""c. The attributes ec_nixl reads from vLLM's objects (SchedulerOutput, the configs,
Request, ...) exist in the release's classes, through their bases. Which of our
expressions stand for which vLLM class is declared in READS; the attributes read
through them are found in our sources, so a new read is checked without a change
here, and an entry that no longer matches anything is named."""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from integration.compat.ours import CONNECTOR
from integration.compat.report import Section
from integration.compat.source_tree import SourceTree

_OUTPUT = "vllm.v1.core.sched.output"
SCHEDULER_OUTPUT = (_OUTPUT, "SchedulerOutput")
NEW_REQUEST_DATA = (_OUTPUT, "NewRequestData")
VLLM_CONFIG = ("vllm.config", "VllmConfig")
EC_TRANSFER_CONFIG = ("vllm.config", "ECTransferConfig")
MODEL_CONFIG = ("vllm.config", "ModelConfig")
PARALLEL_CONFIG = ("vllm.config", "ParallelConfig")
REQUEST = ("vllm.v1.request", "Request")
FEATURE = ("vllm.multimodal.inputs", "MultiModalFeatureSpec")
PLACEHOLDER = ("vllm.multimodal.inputs", "PlaceholderRange")
PLATFORM = ("vllm.platforms.interface", "Platform")
ROLE = ("vllm.distributed.ec_transfer.ec_connector.base", "ECConnectorRole")
FACTORY = ("vllm.distributed.ec_transfer.ec_connector.factory", "ECConnectorFactory")


@dataclass(frozen=True)
class Reads:
    """In our file `path`, the expression `receiver` (as ast.unparse writes it) is an
    instance of vLLM's class `cls`: within function `scope` (a qualified name such as
    "ProducerScheduler.uses"), or the whole file. The narrowest scope wins."""

    path: str
    receiver: str
    cls: tuple[str, str]
    scope: str = ""


READS = [
    Reads(CONNECTOR, "vllm_config", VLLM_CONFIG),
    Reads(CONNECTOR, "self._vllm_config", VLLM_CONFIG),
    Reads(CONNECTOR, "transfer", EC_TRANSFER_CONFIG),
    Reads(CONNECTOR, "model", MODEL_CONFIG),
    Reads(CONNECTOR, "parallel", PARALLEL_CONFIG),
    Reads(CONNECTOR, "scheduler_output", SCHEDULER_OUTPUT),
    Reads(CONNECTOR, "request", REQUEST),
    Reads(CONNECTOR, "request.mm_features[index]", FEATURE),
    Reads(CONNECTOR, "current_platform", PLATFORM),
    Reads(CONNECTOR, "ECConnectorRole", ROLE),
    Reads("ec_nixl/plugin.py", "ECConnectorFactory", FACTORY),
    Reads("ec_nixl/consumer/scheduler.py", "request", REQUEST),
    Reads("ec_nixl/consumer/scheduler.py", "feature", FEATURE),
    Reads("ec_nixl/consumer/scheduler.py", "position", PLACEHOLDER),
    Reads("ec_nixl/producer/scheduler.py", "request", REQUEST),
    Reads("ec_nixl/producer/scheduler.py", "request", NEW_REQUEST_DATA, "ProducerScheduler.uses"),
    Reads("ec_nixl/producer/scheduler.py", "feature", FEATURE),
]


def check(release: SourceTree, ours: SourceTree) -> Section:
    section = Section("c", "the attributes ec_nixl reads from vLLM's objects")
    reads, used = attribute_reads(ours)
    for binding in READS:
        if binding not in used:
            section.fail(
                f"{binding.path} reads nothing through {binding.receiver!r} "
                f"({binding.scope or 'anywhere'}): update READS in {__name__}"
            )
    for cls in sorted(reads):
        module, name = cls
        info = release.find_class(module, name)
        if info is None:
            section.fail(f"{module} has no class {name}")
            continue
        members = info.members()
        missing = sorted(set(reads[cls]) - members)
        for attribute in missing:
            where = ", ".join(reads[cls][attribute])
            section.fail(f"{name} ({release.where(info)}) has no {attribute} (read at {where})")
        if not missing:
            section.ok(f"{name} ({release.where(info)}): {', '.join(sorted(reads[cls]))}")
    return section


def attribute_reads(
    ours: SourceTree,
) -> tuple[dict[tuple[str, str], dict[str, list[str]]], set[Reads]]:
    """vLLM class -> attribute -> where we read it, and the READS entries that matched."""
    reads: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    used: set[Reads] = set()
    for path in sorted({binding.path for binding in READS}):
        bindings = [binding for binding in READS if binding.path == path]
        for scope, node in _scoped_nodes(ours.parse(path)):
            if not isinstance(node, ast.Attribute) or not isinstance(node.ctx, ast.Load):
                continue
            receiver = ast.unparse(node.value)
            matching = [
                b
                for b in bindings
                if b.receiver == receiver
                and (not b.scope or scope == b.scope or scope.startswith(f"{b.scope}."))
            ]
            if matching:
                binding = max(matching, key=lambda b: len(b.scope))
                used.add(binding)
                reads[binding.cls][node.attr].append(f"{path}:{node.lineno}")
    return reads, used


def _scoped_nodes(node: ast.AST, scope: str = "") -> Iterator[tuple[str, ast.AST]]:
    """Every node under `node`, with the qualified name of the class or function it is in."""
    for child in ast.iter_child_nodes(node):
        inner = scope
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            inner = f"{scope}.{child.name}" if scope else child.name
        yield scope, child
        yield from _scoped_nodes(child, inner)
