"""vLLM plugin hook: with ec_nixl installed, `"ec_connector": "ECNixlConnector"` works
without `ec_connector_module_path`.

vLLM loads every `vllm.general_plugins` entry point in each of its processes
before it builds connectors, so registering the short name here reaches the
scheduler and the workers alike.
"""

import contextlib


def register() -> None:
    from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory

    with contextlib.suppress(ValueError):  # already registered in this process
        ECConnectorFactory.register_connector(
            "ECNixlConnector", "ec_nixl.connector", "ECNixlConnector"
        )
