"""The export event stream as a public interface, with real exporters on loopback:
`ec-nixl events` prints it for routers and operators, and the proxy's directory
keeps from it which encoder holds which item."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import wait_until

from ec_nixl.control.security import TOKEN_ENV, Security
from ec_nixl.producer.exporter import Exporter, ExporterConfig
from ec_nixl.proxy.directory import EncoderDirectory

TOKEN = "events-token"
ROOM_FOR_4 = 16 << 10


def embedding() -> torch.Tensor:
    return torch.ones((16, 32), dtype=torch.float16)  # 1 KiB, a 4 KiB slot


def events_command(address: str, token: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    if token:
        env[TOKEN_ENV] = token
    return subprocess.Popen(
        [sys.executable, "-m", "ec_nixl.cli", "events", "--encoder", address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def test_events_prints_what_is_held_then_each_change_as_json_lines():
    config = ExporterConfig(capacity_bytes=ROOM_FOR_4, security=Security(TOKEN))
    exporter = Exporter(config)
    exporter.export("held-before", embedding())
    command = events_command(exporter.address, TOKEN)
    try:
        first = json.loads(command.stdout.readline())
        for n in range(4):  # the fourth takes the room of the least recently used
            exporter.export(f"later-{n}", embedding())
        lines = [json.loads(command.stdout.readline()) for _ in range(5)]
    finally:
        command.kill()
        exporter.close()
    assert set(first) == {
        "encoder", "kind", "mm_hash", "length", "epoch", "snapshot", "published", "time"
    }  # fmt: skip
    assert first["snapshot"] and not any(line["snapshot"] for line in lines)
    assert all(0 <= line["time"] - line["published"] < 5 for line in lines)  # one host: one clock
    assert first["encoder"] == exporter.address and first["epoch"] == exporter.epoch
    assert (first["kind"], first["mm_hash"], first["length"]) == ("exported", "held-before", 1024)
    assert [(line["kind"], line["mm_hash"]) for line in lines[3:]] == [
        ("evicted", "held-before"),
        ("exported", "later-3"),
    ]


def test_events_without_the_token_exits_1_with_the_refusal():
    exporter = Exporter(ExporterConfig(capacity_bytes=ROOM_FOR_4, security=Security(TOKEN)))
    try:
        command = events_command(exporter.address, token=None)
        _, err = command.communicate(timeout=30)
    finally:
        exporter.close()
    assert command.returncode == 1 and "UNAUTHENTICATED" in err


def test_events_from_an_encoder_nobody_runs_exits_1_naming_it():
    exporter = Exporter(ExporterConfig(capacity_bytes=ROOM_FOR_4))
    address = exporter.address
    exporter.close()
    command = events_command(address, token=None)
    _, err = command.communicate(timeout=30)
    assert command.returncode == 1 and address in err and "UNAVAILABLE" in err


def test_the_directory_knows_the_holder_of_each_item_until_it_is_evicted_or_gone():
    enc0 = Exporter(ExporterConfig(capacity_bytes=ROOM_FOR_4))
    enc1 = Exporter(ExporterConfig(capacity_bytes=ROOM_FOR_4))
    directory = EncoderDirectory({"enc0": enc0.address, "enc1": enc1.address})
    try:
        enc0.export("on-enc0", embedding())
        enc1.export("on-enc1", embedding())
        assert wait_until(lambda: directory.holder("on-enc0") == "enc0")
        assert wait_until(lambda: directory.holder("on-enc1") == "enc1")
        for n in range(4):
            enc0.export(f"newer-{n}", embedding())
        assert wait_until(lambda: directory.holder("on-enc0") is None)  # evicted
        enc1.close()
        assert wait_until(lambda: directory.holder("on-enc1") is None)  # its stream is lost
        assert directory.holder("newer-3") == "enc0"
    finally:
        directory.close()
        enc0.close()
        enc1.close()
