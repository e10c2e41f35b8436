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


# `VOLPLANE_DELAY_AT=detach-response=1.0` makes the process wait that many seconds at a
# named point (async): a test widens a race window that load opens only rarely.
_delays: dict[str, float] = {}
for _item in os.environ.get("VOLPLANE_DELAY_AT", "").split(","):
    _name, _, _secs = _item.partition("=")
    if _name.strip() and _secs.strip():
        _delays[_name.strip()] = float(_secs)


async def delay(name: str) -> None:
    seconds = _delays.get(name)
    if seconds:
        import asyncio
        await asyncio.sleep(seconds)


def point(name: str) -> None:
    if name in _points:
        sys.stdout.write(f'{{"event": "fault injected, exiting hard", "point": "{name}"}}\n')
        sys.stdout.flush()
        os._exit(86)


# Wall-clock steps, for the leader-election tests: VOLPLANE_WALL_CLOCK_OFFSET_FILE names
# a file holding a number of seconds that this process adds to time.time() (re-read at
# every call; missing or empty means 0). A test writes "30" into it mid-run and the
# process sees its wall clock step, as after an NTP correction on its host, while
# time.monotonic() goes on undisturbed. Unset in production: time.time is untouched.
_offset_file = os.environ.get("VOLPLANE_WALL_CLOCK_OFFSET_FILE") or ""


def wall_clock_offset() -> float:
    try:
        with open(_offset_file) as f:
            return float(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0.0


def install_clock_hook() -> bool:
    """Makes time.time() include the offset file's seconds (only when the variable is set)."""
    if not _offset_file:
        return False
    import time

    real = time.time
    if getattr(real, "volplane_stepped", False):
        return True

    def stepped() -> float:
        return real() + wall_clock_offset()

    stepped.volplane_stepped = True
    time.time = stepped
    return True
