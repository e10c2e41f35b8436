"""volplane.logs: one JSON object per line, structlog and stdlib (Kopf) alike, flushed."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from volplane import logs


class _Stream(io.StringIO):
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


@pytest.fixture
def stream() -> Iterator[_Stream]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("kopf").level)
    out = _Stream()
    logs.configure("json", "INFO", stream=out)
    yield out
    structlog.reset_defaults()
    root.handlers[:], root.level = saved[0], saved[1]
    logging.getLogger("kopf").setLevel(saved[2])


def _lines(stream: _Stream) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_structlog_and_stdlib_lines_are_json(stream: _Stream) -> None:
    log = logs.get("pv-binder")
    log.info("bound", kind="PersistentVolumeClaim", namespace="ns", name="data",
             volume="pv-1", action="bind", steps=3, duration_ms=1.5)
    log.debug("filtered out at INFO")
    logging.getLogger("kopf.objects").info("kopf INFO is demoted")
    logging.getLogger("kopf.objects").warning("kopf says %s", "hi")
    lines = _lines(stream)
    assert [line["event"] for line in lines] == ["bound", "kopf says hi"]
    bound = lines[0]
    assert bound["controller"] == "pv-binder" and bound["level"] == "info"
    assert (bound["name"], bound["steps"], bound["volume"]) == ("data", 3, "pv-1")
    assert bound["timestamp"].endswith("Z")
    assert lines[1]["level"] == "warning"
    # one flush per line: a hard exit (os._exit) right after a line keeps it
    assert stream.flushes >= 2


def test_exceptions_are_rendered(stream: _Stream) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logs.get("runtime").exception("task crashed", task="t")
    (line,) = _lines(stream)
    assert line["level"] == "error" and line["task"] == "t"
    assert "RuntimeError: boom" in line["exception"]
