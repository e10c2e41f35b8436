"""What every controller is handed: the API client, the cache, the event recorder."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .cache import Cache
from .events import EventRecorder
from .kube import Kube


@dataclass
class Options:
    resync_period: float = 15.0
    workers: int = 16
    unmount_max_wait: float = 360.0
    watch_layer: str = "reflector"  # or "kopf" (the design until 0.2; see runtime.py)
    list_page_size: int = 500
    watch_timeout: int = 300


@dataclass
class Context:
    kube: Kube
    cache: Cache
    events: EventRecorder
    options: Options = field(default_factory=Options)
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    pv_controller: object | None = None  # set by the PV controller; plugins register on it
