"""What every controller is handed: the API client, the informers, the event recorder."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .events import EventRecorder
from .informers import Informers
from .kube import Kube


@dataclass
class Options:
    resync_period: float = 15.0
    workers: int = 16
    unmount_max_wait: float = 360.0
    flex_volume_plugin_dir: str | None = None   # None: no FlexVolume prober (unit tests)
    flex_call_timeout: float = 120.0
    flex_verify_period: float = 60.0


@dataclass
class Context:
    kube: Kube
    informers: Informers
    events: EventRecorder
    options: Options = field(default_factory=Options)
    synced: asyncio.Event = field(default_factory=asyncio.Event)
