"""What the compatibility check knows of ec_nixl: where its sources are, which file
holds the connector, and how a file names what it imports from vLLM."""

from __future__ import annotations

import ast
from pathlib import Path

from integration.compat.source_tree import SourceTree

ROOT = Path(__file__).resolve().parents[2]
CONNECTOR = "ec_nixl/connector.py"
CONNECTOR_CLASS = "ECNixlConnector"


def our_tree(root: Path = ROOT) -> SourceTree:
    """ec_nixl's sources, read like a release's (nothing of it is imported)."""
    return SourceTree.from_directory(root, "ec_nixl", "ec_nixl")


def vllm_imports(tree: ast.Module) -> dict[str, tuple[str, str]]:
    """Local name -> (vLLM module, name), for every `from vllm... import` in a file."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level and is_vllm(node.module):
            for alias in node.names:
                names[alias.asname or alias.name] = (node.module, alias.name)
    return names


def is_vllm(module: str | None) -> bool:
    return module is not None and module.split(".")[0] == "vllm"
