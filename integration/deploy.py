"""Stand up one way of serving the tiny model on this machine, for the demo and benchmarks.

A connector name gives E (encoder only, core 0) + PD (core 1) + the EPD proxy;
None gives one ordinary instance on both cores (no disaggregation). While it
runs, the peak resident memory of each vLLM instance is sampled.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from integration.servers import (
    PeakRss,
    Server,
    free_port,
    start_proxy,
    start_vllm,
    wait_healthy,
)
from integration.tiny_vlm import embedding_bytes

CONNECTORS = ("ECNixlConnector", "ECExampleConnector")
# vLLM's workers busy-poll for a second after their last step, and on 2 cores that
# starves another deployment's request (measured: ~1 s instead of ~100 ms). Ways
# that take turns pause this long before each turn, so the one before has gone quiet.
QUIET_S = 1.5


def connector_configs(name: str, workdir: Path, timed: bool = False) -> tuple[dict, dict]:
    """(encoder's, PD's) --ec-transfer-config for a connector; `timed`: their workers log
    each save and load (integration.timed_connectors)."""
    if name == "ECNixlConnector":
        control = f"127.0.0.1:{free_port()}"
        encoder = {"encoder_id": "enc0", "control_address": control}
        pd = {"encoders": {"enc0": control}, "prefetch": True}
    else:
        encoder = pd = {"shared_storage_path": str(workdir / "shared-storage")}
    configs = (
        {"ec_connector": name, "ec_role": "ec_producer", "ec_connector_extra_config": encoder},
        {"ec_connector": name, "ec_role": "ec_consumer", "ec_connector_extra_config": pd},
    )
    if timed:
        for config in configs:
            config["ec_connector"] = f"Timed{name}"
            config["ec_connector_module_path"] = "integration.timed_connectors"
    return configs


@dataclass
class Deployment:
    name: str
    url: str  # where clients send requests
    servers: list[Server]
    startup_s: float = 0.0
    peak_rss_mib: dict[str, float] = field(default_factory=dict)

    def server(self, name: str) -> Server:
        return next(s for s in self.servers if s.name == name)


@contextmanager
def deploy(
    connector: str | None, workdir: Path, timed: bool = False, pd_tensor_parallel: int = 1
) -> Iterator[Deployment]:
    """`workdir` holds `tiny-llava/`; logs go to `workdir/logs/<name>/`. PD at tensor
    parallel 2 runs a rank on each core."""
    name = connector or "single-instance"
    logs = workdir / "logs" / f"{name}-pd-tp{pd_tensor_parallel}"
    print(f"[{name}] starting ...", file=sys.stderr, flush=True)
    if connector is None:
        servers = [start_vllm("single", workdir=workdir, cpu="0-1", log_dir=logs)]
    else:
        encoder_config, pd_config = connector_configs(connector, workdir, timed)
        servers = [
            start_vllm("encoder", workdir=workdir, cpu=0, log_dir=logs, encoder_only=True,
                       ec_transfer_config=encoder_config),
            start_vllm("pd", workdir=workdir, cpu="0|1" if pd_tensor_parallel == 2 else 1,
                       log_dir=logs, ec_transfer_config=pd_config,
                       tensor_parallel=pd_tensor_parallel),
        ]  # fmt: skip
    try:
        startup_s = wait_healthy(servers)
        if connector is not None:
            control = encoder_config["ec_connector_extra_config"].get("control_address")
            servers.append(
                start_proxy(
                    encoders=[servers[0].url], pd=servers[1].url, log_dir=logs,
                    encoder_events={"enc0": control} if control else None,
                )
            )  # fmt: skip
            wait_healthy(servers[-1:])
        print(f"[{name}] healthy in {startup_s:.1f} s; logs in {logs}", file=sys.stderr, flush=True)
        with PeakRss(servers) as rss:
            yield Deployment(name, servers[-1].url, servers, startup_s, rss.peak_mib)
    finally:
        for server in servers:
            server.stop()


def run_rows_bench(args, name: str, bench, table) -> int:
    """Run a benchmark whose result is rows (`bench(args, workdir)`) in a fresh workdir;
    print the embedding size and `table(rows)`, and write the rows to `--json`."""
    with tempfile.TemporaryDirectory(prefix=f"ec-nixl-{name}-") as tmp:
        rows = bench(args, Path(tmp))
    print(f"embedding: {embedding_bytes(args.text_hidden) / (1 << 20):.2f} MiB per image")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2))
    return 0
