"""Accessors, keys and times for Kubernetes objects as plain JSON dicts.

One place for what every layer needs: ``md``/``spec``/``status`` that never fail on a
missing field, the cache key of an object, its resourceVersion as a number, and RFC 3339
timestamps as the API writes them. Pure; no I/O.
"""


import calendar
import datetime as dt
import time
from collections.abc import Mapping
from typing import Any

Obj = Mapping[str, Any]

_EMPTY: Mapping[str, Any] = {}


def md(obj: Obj | None) -> Mapping[str, Any]:
    """``metadata`` (empty when missing)."""
    return (obj or _EMPTY).get("metadata") or _EMPTY


def spec(obj: Obj | None) -> Mapping[str, Any]:
    """``spec`` (empty when missing)."""
    return (obj or _EMPTY).get("spec") or _EMPTY


def status(obj: Obj | None) -> Mapping[str, Any]:
    """``status`` (empty when missing)."""
    return (obj or _EMPTY).get("status") or _EMPTY


def annotations(obj: Obj | None) -> Mapping[str, str]:
    return md(obj).get("annotations") or _EMPTY


def labels(obj: Obj | None) -> Mapping[str, str]:
    return md(obj).get("labels") or _EMPTY


def name(obj: Obj | None) -> str:
    return md(obj).get("name") or ""


def phase(obj: Obj | None) -> str:
    return status(obj).get("phase") or ""


def key_of(obj: Obj) -> str:
    """The cache key: ``namespace/name`` for namespaced objects, ``name`` otherwise."""
    meta = md(obj)
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


def ref_key(ref: Mapping[str, Any] | None) -> str | None:
    """``namespace/name`` of an object reference (a claimRef), None when it names nothing."""
    if not ref or not ref.get("name"):
        return None
    return f"{ref.get('namespace') or ''}/{ref['name']}"


def rv_int(obj: Obj | None) -> int:
    """``metadata.resourceVersion`` as a number (0 when missing or not a number)."""
    try:
        return int(md(obj).get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


def now_rfc3339(clock: float | None = None) -> str:
    """A timestamp the way the API writes ``metav1.Time``: UTC, whole seconds, ``Z``."""
    t = time.time() if clock is None else clock
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_rfc3339_micro(clock: float | None = None) -> str:
    """``metav1.MicroTime`` (Lease renewals): UTC with microseconds."""
    t = time.time() if clock is None else clock
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str | None) -> float | None:
    """Seconds since the epoch of an API timestamp (with or without fractional
    seconds), None when missing or malformed."""
    if not text:
        return None
    base, _, frac = text.rstrip("Z").partition(".")
    try:
        whole = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None
    try:
        return whole + (float(f"0.{frac}") if frac else 0.0)
    except ValueError:
        return None


def created(obj: Obj | None) -> dt.datetime:
    """``metadata.creationTimestamp`` as an aware datetime (the epoch's start when
    missing), for ordering."""
    t = parse_rfc3339(md(obj).get("creationTimestamp"))
    if t is None:
        return dt.datetime.min.replace(tzinfo=dt.UTC)
    return dt.datetime.fromtimestamp(t, dt.UTC)
