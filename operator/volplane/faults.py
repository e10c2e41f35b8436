"""Fault injection for crash-safety tests.

`VOLPLANE_CRASH_AT=bind-2,provision-1` makes the process exit hard (no
cleanup, like SIGKILL) the first time it passes any named point. Points are
placed right after each durable write of a multi-write operation, so a test
can kill the operator between any two writes and check that a restart
converges. Unset in production: the check is one dict lookup.
"""

from __future__ import annotations

import os
import sys

_points = {p.strip() for p in os.environ.get("VOLPLANE_CRASH_AT", "").split(",") if p.strip()}


def point(name: str) -> None:
    if name in _points:
        sys.stdout.write(f'{{"event": "fault injected, exiting hard", "point": "{name}"}}\n')
        sys.stdout.flush()
        os._exit(86)
