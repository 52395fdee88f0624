"""The deployment the reliability suite drives, and what it reads off it.

`Rig` is one encoder (E) + PD + proxy with fixed configurations, so that a
scenario can kill an instance and start it again on the same ports. Its
probes read the instances' own metrics; `PoolWatch` follows E's export events
for the exact bytes E holds.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ec_nixl.control.client import ExportClient
from ec_nixl.control.messages import EventKind
from ec_nixl.control.security import Security
from ec_nixl.errors import ECNixlError
from integration.client import chat_body, image, metric, post
from integration.faults import TcpRelay
from integration.reliability import Outcome, send_one
from integration.servers import PeakRss, Server, start_vllm, wait_healthy


@dataclass
class Rig:
    encoder_dir: Path  # each holds the tiny model under the same --model string
    pd_dir: Path
    logs: Path
    encoder_config: dict
    pd_config: dict
    control: str  # E's own control address (PD's goes through `relay`)
    relay: TcpRelay
    encoder_metrics: str
    security: Security  # what PD presents
    servers: dict[str, Server] = field(default_factory=dict)
    rss: PeakRss | None = None
    budget_mib: dict[str, float] = field(default_factory=dict)
    orphaned: tuple[str, dict] | None = None  # exported by an encoder that was then killed
    _seed: int = 3000

    @property
    def encoder(self) -> Server:
        return self.servers["encoder"]

    @property
    def pd(self) -> Server:
        return self.servers["pd"]

    @property
    def proxy(self) -> Server:
        return self.servers["proxy"]

    def launch(self, name: str, port: int | None = None) -> Server:
        """Start the encoder (core 0) or PD (core 1) with its configuration."""
        if name == "encoder":
            server = start_vllm(
                name, workdir=self.encoder_dir, cpu=0, log_dir=self.logs, encoder_only=True,
                ec_transfer_config=self.encoder_config, port=port,
            )  # fmt: skip
        else:
            server = start_vllm(
                name, workdir=self.pd_dir, cpu=1, log_dir=self.logs,
                ec_transfer_config=self.pd_config, port=port,
            )  # fmt: skip
        self.servers[name] = server
        if self.rss is not None:
            self.rss.servers[name] = server
        return server

    def restart(self, name: str) -> Server:
        """Kill (if alive) and start again on the same ports and configuration; the old
        process's log stays beside the new one as NAME.N.log."""
        old = self.servers[name]
        old.kill()
        earlier = len(list(old.log_path.parent.glob(f"{name}.*.log")))
        old.log_path.rename(old.log_path.with_suffix(f".{earlier + 1}.log"))  # for a failure
        server = self.launch(name, old.port)
        wait_healthy([server])
        return server

    def fresh_image(self) -> str:
        self._seed += 1
        return image(self._seed)

    def orphan(self) -> tuple[str, dict]:
        """An image E has exported, and the params naming it: PD never pulls it."""
        url = self.fresh_image()
        return url, post(self.encoder.url, chat_body(url, max_tokens=1))["ec_transfer_params"]

    def pulled(self) -> float:
        return metric(self.pd.url, "ec_nixl:items_pulled_total")

    def pull_failures(self) -> float:
        return metric(self.pd.url, "ec_nixl:pull_failures_total")

    def deadlines_missed(self) -> float:
        return metric(self.pd.url, "ec_nixl:pull_failures_total", cause="DeadlineExceededError")

    def fallbacks(self) -> float:
        local = metric(self.proxy.url, "ec_nixl_proxy_local_encodes_total")
        return local + metric(self.pd.url, "ec_nixl:fallbacks_total")

    def leases_ended(self) -> dict[str, float]:
        time.sleep(1.5)  # E's endpoint folds new counts in once a second
        return {
            how: metric(self.encoder_metrics, "ec_nixl:leases_ended_total", how=how)
            for how in ("read", "released", "expired")
        }

    def wait_unleased(self, timeout_s: float) -> float:
        """Seconds until E pins nothing for anyone (its cached items stay, unpinned)."""
        start = time.monotonic()
        while metric(self.encoder_metrics, "ec_nixl:leases_live") > 0:
            assert time.monotonic() - start < timeout_s, "E still holds leases"
            time.sleep(0.2)
        return time.monotonic() - start

    def until_pulled(self, since: float, timeout_s: float = 60.0) -> tuple[float, Outcome]:
        """Send fresh images through the proxy until one is pulled; seconds since `since`."""
        pulled, outcome = self.pulled(), Outcome()
        while time.monotonic() < since + timeout_s:
            outcome = outcome.add(send_one(self.proxy.url, chat_body(self.fresh_image()), 30))
            if self.pulled() > pulled:
                return time.monotonic() - since, outcome
            time.sleep(0.2)
        raise AssertionError(f"no pull within {timeout_s:.0f} s")


class PoolWatch:
    """Bytes E holds in its export pool, exactly, from its own event stream."""

    def __init__(self, rig: Rig) -> None:
        self.in_use = self.max_bytes = 0
        self.items = 0
        self._client = ExportClient(rig.control, rig.security)
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        try:
            for event in self._client.watch():
                sign = 1 if event.kind is EventKind.EXPORTED else -1
                self.in_use += sign * event.length
                self.items += sign
                self.max_bytes = max(self.max_bytes, self.in_use)
        except ECNixlError:
            pass  # closed, or the encoder went away

    def close(self) -> None:
        self._client.close()


def in_background(*calls) -> list[Future]:
    """Start each call now, each on its own thread."""
    pool = ThreadPoolExecutor(len(calls))
    futures = [pool.submit(call) for call in calls]
    pool.shutdown(wait=False)
    return futures


def results(futures: list[Future]) -> Outcome:
    outcome = Outcome()
    for future in futures:
        outcome = outcome.add(future.result())
    return outcome
