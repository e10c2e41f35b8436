"""The one patch volplane applies to Kopf: its index-population barrier wakes waiters
only when the barrier opens or closes.

Why it is needed (measured in docs/benchmarks.md). Kopf holds every handler until all
indexes are populated. During the initial listing it adds one toggle per object to the
operator's ``ToggleSet`` and drops it once the object is indexed; every add and drop
calls ``notify_all()`` on the condition that every already-indexed object's worker
waits on (``processing.process_resource_event``: ``operator_indexed.wait_for(True)``).
N objects make O(N^2) wake-ups before the first handler runs: tens of seconds at a few
thousand objects, hours at 25k. No setting or public extension point changes this (the
``ToggleSet`` is created inside Kopf's orchestrator). The waiters only care about the
aggregate state, so notifying only when the aggregate flips is equivalent.

Narrow and pinned: three methods of one class, replaced only on the Kopf version in
pyproject.toml and only if their source is the source this patch was written against
(a hash). Otherwise nothing is patched and the operator says so at start.
``tests/unit/test_kopf_patches.py`` fails when the pinned Kopf changes.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from typing import Any

import kopf
from kopf._cogs.aiokits import aiotoggles

PATCHED_VERSION = "1.45.2"
# sha256 of the source of ToggleSet.make_toggle, drop_toggle and drop_toggles (joined)
# in the pinned Kopf, before patching.
PINNED_DIGEST = "c66cce38649c424ec23cc6e3af9f60f6a65ba1a87479288f0ac88e81516ff648"

_ORIGINALS = {name: getattr(aiotoggles.ToggleSet, name)
              for name in ("make_toggle", "drop_toggle", "drop_toggles")}


def original_source_digest() -> str:
    src = "".join(inspect.getsource(fn) for fn in _ORIGINALS.values())
    return hashlib.sha256(src.encode()).hexdigest()


async def _make_toggle(self, _val: bool = False, *, name: str | None = None):
    toggle = aiotoggles.Toggle(_val, name=name, condition=self._condition)
    async with self._condition:
        before = self.is_on()
        self._toggles.add(toggle)
        if self.is_on() != before:
            self._condition.notify_all()
    return toggle


async def _drop_toggle(self, toggle) -> None:
    async with self._condition:
        before = self.is_on()
        self._toggles.discard(toggle)
        if self.is_on() != before:
            self._condition.notify_all()


async def _drop_toggles(self, toggles) -> None:
    async with self._condition:
        before = self.is_on()
        self._toggles.difference_update(toggles)
        if self.is_on() != before:
            self._condition.notify_all()


def kopf_version() -> str:
    version = getattr(kopf, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version
        version = dist_version("kopf")
    return version


def applicable() -> bool:
    return kopf_version() == PATCHED_VERSION and original_source_digest() == PINNED_DIGEST


def apply() -> bool:
    """Patch (idempotent); False when this Kopf is not the one the patch was made for."""
    if not applicable():
        return False
    cls = aiotoggles.ToggleSet
    cls.make_toggle = _make_toggle
    cls.drop_toggle = _drop_toggle
    cls.drop_toggles = _drop_toggles
    return True


def apply_unless_disabled(log: Any) -> None:
    """apply(), unless VOLPLANE_KOPF_BARRIER_PATCH=0; says so when not applied."""
    if os.environ.get("VOLPLANE_KOPF_BARRIER_PATCH", "1") == "0":
        log.warning("Kopf's index-barrier patch disabled (VOLPLANE_KOPF_BARRIER_PATCH=0)")
    elif not apply():
        log.warning("Kopf's index-barrier patch not applied (unexpected Kopf version): "
                    "start-up with many objects will be slow", expected=PATCHED_VERSION)


def revert() -> None:
    """Kopf's own methods back (benchmarks measure what the patch buys)."""
    for name, fn in _ORIGINALS.items():
        setattr(aiotoggles.ToggleSet, name, fn)

