"""The vLLM releases ec_nixl is checked against, and the warning outside them.

One place for the range: pyproject.toml's `vllm` extra declares the same (a test
compares them), `make compat VLLM=X` checks a release from its sources, and the
README's "Supported versions" says which releases run here end to end.
"""

from __future__ import annotations

import logging

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = SpecifierSet(">=0.32,<0.35")


def vllm_supported(version: str) -> bool:
    """Whether a vLLM version string (a local build such as "0.34.1.dev3+g1234" too)
    falls in the supported range."""
    try:
        return SUPPORTED_VLLM.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def warn_if_unsupported(version: str) -> bool:
    """Log a warning naming `version` when it is outside the range; True if it is in."""
    if vllm_supported(version):
        return True
    logger.warning(
        "ECNixlConnector is checked against vLLM %s; this is vLLM %s. It may work, but "
        "nothing here was checked against it: run `make compat VLLM=%s` in an ec_nixl "
        "checkout to see what differs.",
        SUPPORTED_VLLM,
        version,
        version,
    )
    return False
