"""OpenAI chat requests with images, as a user's client sends them; Prometheus scraping."""

from __future__ import annotations

import base64
import io
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from integration.servers import MODEL_NAME


def image(seed: int, size: int = 64) -> str:
    """A PNG of random pixels, a different one for every seed, as a data: URL.

    Every seed must give a new picture: a repeated one is an encoder-cache hit
    (and a file already on disk for shared storage), which skews a benchmark.
    """
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(images: str | list[str], max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    """A greedy chat request about one image or several (data: URLs)."""
    urls = [images] if isinstance(images, str) else images
    content = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    content.append({"type": "text", "text": "Describe it."})
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
        **extra,
    }


def conversation(url: str, image_url: str, questions: tuple[str, ...] = ("Describe it.", "More?")):
    """The answers of a chat about one image, a turn per question: each turn sends the
    whole history again, the image with it (as chat clients do)."""
    messages: list[dict[str, Any]] = []
    answers = []
    for turn, question in enumerate(questions):
        content: list[dict[str, Any]] = [{"type": "text", "text": question}]
        if turn == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
        messages.append({"role": "user", "content": content})
        body = {**chat_body([]), "messages": messages}
        answers.append(post(url, body)["choices"][0]["message"]["content"])
        messages = [*messages, {"role": "assistant", "content": answers[-1]}]
    return answers


def post(url: str, body: dict[str, Any], timeout_s: float = 120) -> dict[str, Any]:
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as reply:
        return json.loads(reply.read())


def answer(url: str, images: str | list[str], **extra: Any) -> str:
    return post(url, chat_body(images, **extra))["choices"][0]["message"]["content"]


def stream_ttft(url: str, body: dict[str, Any], timeout_s: float = 120) -> tuple[float, str]:
    """(seconds to the first generated token, the whole answer) of a streamed request."""
    body = {**body, "stream": True}
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    start, first, text = time.perf_counter(), None, []
    with urllib.request.urlopen(request, timeout=timeout_s) as reply:
        for line in reply:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                first = first or time.perf_counter()
                text.append(delta)
    return (first or time.perf_counter()) - start, "".join(text)


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of a metric at a Prometheus endpoint whose labels include `labels`."""
    return metric_in(scrape(url), name, **labels)


def scrape(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        return reply.read().decode()


def metric_in(text: str, name: str, **labels: str) -> float:
    """`metric` on Prometheus text already fetched."""
    return sum(
        sample.value for sample in samples(text, name) if labels.items() <= sample.labels.items()
    )


def samples(text: str, name: str) -> list[Sample]:
    return [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def main() -> None:
    """`python -m integration.client URL [JSON_BODY] [TIMEOUT_S]`: GET or POST once, print
    the status and the body. For tests that must send from inside another network namespace."""
    url, body = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "")
    timeout_s = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
    request = urllib.request.Request(
        url, body.encode() or None, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            print(reply.status)
            print(reply.read().decode())
    except (OSError, urllib.error.HTTPError) as exc:
        print(getattr(exc, "code", 0))
        print(repr(exc))


if __name__ == "__main__":
    main()
