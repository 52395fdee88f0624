"""Figures of the reliability suite: what each scenario sent, what came back, how it recovered.

`tests/test_reliability.py` runs every scenario against a real encoder + PD +
proxy and fills one `Row` each; `make reliability` runs that file and writes
`docs/RELIABILITY.md` from the rows (`write_report`). Traffic goes through
`send_all`, which gives every request a deadline: a request without an answer
by then counts as hung, which is what the suite exists to rule out.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = (
    "| scenario | sent | answered | clear errors | fallbacks | hung "
    "| max RSS MiB | budget MiB | recovery s |"
)


@dataclass
class Outcome:
    """How a batch of requests ended: each is answered, a clear error, or hung."""

    answered: int = 0
    clear_errors: int = 0
    hung: int = 0
    slowest_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return self.answered + self.clear_errors + self.hung

    def add(self, other: Outcome) -> Outcome:
        return Outcome(
            self.answered + other.answered,
            self.clear_errors + other.clear_errors,
            self.hung + other.hung,
            max(self.slowest_s, other.slowest_s),
            self.errors + other.errors,
        )


def send_one(url: str, body: dict[str, Any], deadline_s: float) -> Outcome:
    """POST a chat request; an answer needs HTTP 200 and generated text."""
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=deadline_s) as reply:
            text = json.loads(reply.read())["choices"][0]["message"]["content"]
        outcome = Outcome(answered=1) if text else Outcome(clear_errors=1, errors=["empty answer"])
    except urllib.error.HTTPError as exc:
        outcome = Outcome(clear_errors=1, errors=[f"HTTP {exc.code}: {exc.read()[:200]!r}"])
    except TimeoutError:
        outcome = Outcome(hung=1, errors=[f"no answer within {deadline_s:.0f} s"])
    except (urllib.error.URLError, ConnectionError) as exc:
        outcome = Outcome(clear_errors=1, errors=[f"connection: {exc}"])
    outcome.slowest_s = time.monotonic() - start
    return outcome


def send_all(
    url: str, bodies: list[dict[str, Any]], *, concurrency: int, deadline_s: float
) -> Outcome:
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(lambda body: send_one(url, body, deadline_s), bodies))
    total = Outcome()
    for outcome in outcomes:
        total = total.add(outcome)
    return total


@dataclass
class Row:
    scenario: str
    what: str  # what the scenario does and what it checks
    outcome: Outcome
    fallbacks: int
    max_rss_mib: dict[str, float]  # per instance
    budget_mib: dict[str, float]
    recovery_s: float | None = None
    notes: list[str] = field(default_factory=list)  # measured along the way

    def cells(self) -> list[str]:
        def per_instance(values: dict[str, float]) -> str:
            return " / ".join(f"{name} {values[name]:.0f}" for name in sorted(values))

        return [
            self.scenario,
            str(self.outcome.sent),
            str(self.outcome.answered),
            str(self.outcome.clear_errors),
            str(self.fallbacks),
            str(self.outcome.hung),
            per_instance(self.max_rss_mib),
            per_instance(self.budget_mib),
            "-" if self.recovery_s is None else f"{self.recovery_s:.1f}",
        ]


def write_report(
    rows: list[Row], path: Path, setup: str, elsewhere: list[tuple[str, str]] = ()
) -> None:
    """The table and each scenario's notes; `elsewhere`: (attack or fault, the test that
    checks it) for those checked below the whole deployment."""
    lines = [
        "# Reliability figures",
        "",
        "Written by `make reliability` (tests/test_reliability.py): real vLLM instances on",
        "the CPU, real NIXL, real gRPC, real signals. Rerun it to refresh this file.",
        "",
        setup,
        "",
        HEADER,
        "|" + "---|" * 9,
        *("| " + " | ".join(row.cells()) + " |" for row in rows),
        "",
        "*sent* = *answered* + *clear errors* + *hung*. *fallbacks*: items PD encoded itself",
        "(its `ec_nixl:fallbacks_total`) plus requests the proxy sent on without an encoder",
        "(`ec_nixl_proxy_local_encodes_total`). *recovery s*: from the end of the fault until",
        "a request is again served with a pull from the encoder.",
        "",
        "## What each scenario does",
        "",
    ]
    for row in rows:
        lines += [f"### {row.scenario}", "", row.what, ""]
        lines += [f"- {note}" for note in row.notes]
        lines += [f"- error seen: {error}" for error in sorted(set(row.outcome.errors))[:5]]
        lines.append("")
    if elsewhere:
        lines += [
            "## Checked below the whole deployment",
            "",
            "Attacks and faults that need no vLLM to show, each checked by a test against the",
            "real exporter, receiver, NIXL and gRPC:",
            "",
            *(f"- {what}: `{test}`" for what, test in elsewhere),
            "",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
