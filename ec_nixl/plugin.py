"""vLLM plugin hook: with ec_nixl installed, `"ec_connector": "ECNixlConnector"` works
without `ec_connector_module_path`, and a vLLM outside the supported range is
named in a warning.

vLLM loads every `vllm.general_plugins` entry point in each of its processes
before it builds connectors, so registering the short name here reaches the
scheduler and the workers alike.
"""

import contextlib

from ec_nixl.versions import warn_if_unsupported


def register() -> None:
    import vllm
    from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory

    warn_if_unsupported(vllm.__version__)
    with contextlib.suppress(ValueError):  # already registered in this process
        ECConnectorFactory.register_connector(
            "ECNixlConnector", "ec_nixl.connector", "ECNixlConnector"
        )
