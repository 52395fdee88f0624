"""`ec-nixl events`: an encoder's export events as JSON lines, until the stream ends.

One object per line, in the order the encoder sent them:

    {"encoder": "10.0.0.5:50051", "kind": "exported", "mm_hash": "9f2c...",
     "length": 4718592, "epoch": 1733112000123, "snapshot": false,
     "published": 1733112010.518402, "time": 1733112010.519876}

- kind: "exported" (the item is held and can be pulled), "encoding" (an
  encoder step is about to encode it; "exported" follows unless the step
  fails), "evicted" (its room went to a newer export);
- length: the item's bytes; epoch: changes with every encoder process (a new
  epoch means nothing of the old one is held); published: when the encoder
  published it, by its clock; time: when this side received it (Unix seconds).
The stream begins with an "exported" line for every item held at that moment
("snapshot": true), so a follower that reconnects is in sync again; an item
may be announced twice. A router keeps `mm_hash -> encoder` from it; an operator watches what
an encoder holds. The schema is `ec_nixl.v1.ExportService/WatchEvents`
(docs/EVENTS.md); lines only gain keys. Exits 0 when the encoder ends the
stream, 1 with the reason when it cannot be reached or refuses the token, 2
when the token cannot be had (a token file open to others, say) or TLS is
required and missing.

The token: --token, else --token-file, else $EC_NIXL_TOKEN (the first keeps
it in the process list: prefer the others).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from ec_nixl.control.client import ExportClient
from ec_nixl.control.messages import Announcement
from ec_nixl.control.security import add_client_arguments, client_security
from ec_nixl.errors import ConfigError, ECNixlError


def event_json(event: Announcement, encoder: str, received_at: float) -> dict[str, Any]:
    return {
        "encoder": encoder,
        "kind": event.kind.value,
        "mm_hash": event.mm_hash,
        "length": event.length,
        "epoch": event.epoch,
        "snapshot": event.snapshot,
        "published": round(event.published_unix_ns / 1e9, 6),
        "time": round(received_at, 6),
    }


def follow(client: ExportClient, out: TextIO) -> None:
    """Print the events of one encoder until its stream ends (ECNixlError if it fails)."""
    for event in client.watch():
        out.write(json.dumps(event_json(event, client.address, time.time())) + "\n")
        out.flush()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--encoder", required=True, metavar="HOST:PORT",
        help="the encoder's control address (its ec_connector_extra_config.control_address)",
    )  # fmt: skip
    add_client_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        security = client_security(args, [args.encoder])
    except ConfigError as exc:
        print(f"ec-nixl events: {exc}", file=sys.stderr)
        return 2
    client = ExportClient(args.encoder, security)
    try:
        follow(client, sys.stdout)
    except ECNixlError as exc:
        print(f"ec-nixl events: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return 0
