"""Does ECNixlConnector fit a vLLM release? A check of its sources, without installing it.

vLLM's newest releases ship CUDA builds only, so this box cannot run them; what the
connector relies on is read instead from the release's Python sources (its sdist,
see integration.vllm_release) with `ast`, and from ec_nixl's own sources the same
way, so no vLLM needs to be importable:

  a. the vLLM classes `ec_nixl/connector.py` extends (ECConnectorBase first): their
     abstract methods are implemented, every method we override takes every call
     the base's signature allows (positional or by name), the attributes we use
     from the base exist, and our `super()` calls fit;
  b. every vLLM name ec_nixl imports (anywhere: in functions, under TYPE_CHECKING)
     is defined or re-exported by its module, and our calls to vLLM fit;
  c. the attributes ec_nixl reads from vLLM's objects (SchedulerOutput, the configs,
     Request, ...; see reads.READS) exist in the release's classes;
  d. the release's `collect_ec_item_metadata`, run (with torch) on real-shaped image
     features, merged into E's answer by ProducerScheduler.finished and read by PD's
     parse_params: every item maps to our encoder, with no key PD does not know;
  e. who calls the connector's hooks (table), whether the V1 model runner exists,
     and whether every call of a hook we implement reaches ours with what it needs.

    python -m integration.compat --vllm 0.34.0     # or: make compat VLLM=0.34.0
    python -m integration.compat                   # every pinned release
    python -m integration.compat --sources ~/vllm  # a checkout (its vllm/ folder)

Exit status 0 only if every check passes; each failure is named.
"""

from __future__ import annotations

from integration import vllm_release
from integration.compat import bases, hooks, imports, items, reads
from integration.compat.ours import CONNECTOR, our_tree
from integration.compat.report import Report
from integration.compat.source_tree import SourceTree

__all__ = ["CONNECTOR", "Report", "SourceTree", "check", "our_tree", "release_tree"]


def release_tree(version: str) -> SourceTree:
    """A pinned release's `vllm/` sources, read from its sdist (fetched once)."""
    files = vllm_release.read_members(
        version, lambda path: path.startswith("vllm/") and path.endswith(".py")
    )
    label = f"vLLM {version} ({vllm_release.release(version).filename})"
    return SourceTree({path: data.decode("utf-8") for path, data in files.items()}, label)


def check(release: SourceTree, ours: SourceTree | None = None) -> Report:
    """Checks a to e of a release's sources against ec_nixl's (this checkout's unless
    `ours` is given)."""
    ours = ours or our_tree()
    sections = [
        bases.check(release, ours),
        imports.check(release, ours),
        reads.check(release, ours),
        items.check(release),
        hooks.check(release, ours),
    ]
    return Report(release.label, sections)
