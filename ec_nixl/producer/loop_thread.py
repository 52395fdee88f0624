"""An asyncio event loop on a thread of its own, for the encoder's servers.

The export service and the /metrics endpoint serve any number of connections
without a thread each: each runs on a loop of its own thread, started and
stopped the same way.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")

CLOSE_TIMEOUT_S = 5.0


class LoopThread:
    """`loop`, run by a daemon thread named `name` from `start` until `close`."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.new_event_loop()
        self._name = name

    def start(self, begin: Callable[[], Awaitable[T]]) -> T:
        """Run the loop, first `begin()` on it: its result, or what it raised (the loop
        is then closed)."""
        begun: Future[T] = Future()
        self._thread = threading.Thread(
            target=self._run, args=(begin, begun), name=self._name, daemon=True
        )
        self._thread.start()
        return begun.result()

    def close(self, end: Callable[[], Awaitable[object]] | None = None) -> None:
        """Run `end()` on the loop (if given), stop it, cancel what still runs there."""
        if self._thread.is_alive():
            if end is not None:
                ending = asyncio.run_coroutine_threadsafe(end(), self.loop)
                ending.result(CLOSE_TIMEOUT_S * 2)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(CLOSE_TIMEOUT_S)

    def _run(self, begin: Callable[[], Awaitable[T]], begun: Future[T]) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            begun.set_result(self.loop.run_until_complete(begin()))
        except BaseException as exc:
            self.loop.close()
            begun.set_exception(exc)
            return
        self.loop.run_forever()
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.close()
