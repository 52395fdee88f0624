"""Benchmark only: ECNixlConnector and vLLM's ECExampleConnector, unchanged, except
that their workers log the two steps a connector adds to a request's critical
path: the encoder worker's save of each output (into shared storage, or into
the export pool), and the PD worker's load of a step's outputs into the encoder
cache. `ec-nixl bench ttft` reads these lines, so both connectors are measured
at the same points, the same way.

    --ec-transfer-config '{"ec_connector": "TimedECExampleConnector",
                           "ec_connector_module_path": "integration.timed_connectors", ...}'
"""

from __future__ import annotations

import logging
import time

from vllm.distributed.ec_transfer.ec_connector.example_connector import ECExampleConnector

from ec_nixl.connector import ECNixlConnector
from integration.ttft_measures import LOAD_LINE, SAVE_LINE

# A child of vLLM's logger: the line lands in the server's log with vLLM's own.
logger = logging.getLogger("vllm.ec_nixl_bench")


def timed(connector: type) -> type:
    class Timed(connector):
        def save_caches(self, encoder_cache, mm_hash, **kwargs) -> None:
            start = time.perf_counter()
            super().save_caches(encoder_cache, mm_hash, **kwargs)
            logger.info(SAVE_LINE.format(items=1, ms=(time.perf_counter() - start) * 1000))

        def start_load_caches(self, encoder_cache, **kwargs) -> None:
            before = len(encoder_cache)
            start = time.perf_counter()
            super().start_load_caches(encoder_cache, **kwargs)
            if (items := len(encoder_cache) - before) > 0:
                ms = (time.perf_counter() - start) * 1000
                logger.info(LOAD_LINE.format(items=items, ms=ms))

    Timed.__name__ = Timed.__qualname__ = f"Timed{connector.__name__}"
    return Timed


TimedECNixlConnector = timed(ECNixlConnector)
TimedECExampleConnector = timed(ECExampleConnector)
