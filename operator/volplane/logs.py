"""Structured logging: structlog, JSON by default, one line per event.

Stable keys: controller, kind, namespace, name, action, duration_ms, error.
Kopf's own stdlib logging is routed through the same renderer so that every
line the process prints is one JSON object.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(fmt: str = "json", level: str = "INFO") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    # Kopf is chatty at INFO about every handler it runs; keep its warnings.
    logging.getLogger("kopf").setLevel(lvl if lvl <= logging.DEBUG else max(lvl, logging.WARNING))
    logging.getLogger("kopf.activities.startup").setLevel(lvl)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def get(controller: str | None = None, **bind):
    """A lazy logger: safe to create at import time, before configure() runs."""
    if controller:
        bind["controller"] = controller
    return structlog.get_logger("volplane", **bind)
