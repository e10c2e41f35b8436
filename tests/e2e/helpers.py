"""Small helpers for the e2e suite: polling, generic object access and Events."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import pykube
import requests

T = TypeVar("T")

_factories: dict[tuple[int, str, str], type[pykube.objects.APIObject]] = {}


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.2,
    message: str = "condition",
) -> T:
    """Calls predicate until it returns something truthy and returns that.

    Exceptions from the predicate count as "not yet" (the object may not exist yet);
    on timeout, raises TimeoutError with `message`, the last value and last exception.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    last_exc: BaseException | None = None
    while True:
        try:
            last = predicate()
            last_exc = None
            if last:
                return last
        except (pykube.exceptions.PyKubeError, requests.RequestException, KeyError,
                IndexError, TypeError, AssertionError) as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f"; last value: {last!r}"
            if last_exc is not None:
                detail += f"; last error: {last_exc!r}"
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {message}{detail}")
        time.sleep(interval)


def holds_for(
    predicate: Callable[[], Any],
    duration: float,
    interval: float = 0.5,
    message: str = "condition",
) -> None:
    """Asserts predicate stays truthy for `duration` seconds (checked every `interval`).

    The predicate may itself raise AssertionError with a more precise message."""
    deadline = time.monotonic() + duration
    start = time.monotonic()
    while True:
        value = predicate()
        assert value, f"{message} stopped holding after {time.monotonic() - start:.1f} s: {value!r}"
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


def kind_class(api: pykube.HTTPClient, api_version: str, kind: str) -> type[pykube.objects.APIObject]:
    """A pykube class for any kind (discovered once per client, then cached)."""
    key = (id(api), api_version, kind)
    if key not in _factories:
        builtin = getattr(pykube, kind, None)
        if (
            isinstance(builtin, type)
            and issubclass(builtin, pykube.objects.APIObject)
            and builtin.version == api_version
        ):
            _factories[key] = builtin
        else:
            _factories[key] = pykube.object_factory(api, api_version, kind)
    return _factories[key]


def create(api: pykube.HTTPClient, manifest: dict) -> pykube.objects.APIObject:
    """Creates any object from a manifest dict; returns it as the server stored it."""
    cls = kind_class(api, manifest["apiVersion"], manifest["kind"])
    obj = cls(api, manifest)
    obj.create()
    return obj


def get(
    api: pykube.HTTPClient, api_version: str, kind: str, name: str, namespace: str | None = None
) -> pykube.objects.APIObject:
    """Fetches one object (raises pykube.ObjectDoesNotExist if it is absent)."""
    cls = kind_class(api, api_version, kind)
    query = cls.objects(api, namespace=namespace) if namespace else cls.objects(api)
    return query.get_by_name(name)


def get_or_none(
    api: pykube.HTTPClient, api_version: str, kind: str, name: str, namespace: str | None = None
) -> pykube.objects.APIObject | None:
    try:
        return get(api, api_version, kind, name, namespace)
    except pykube.exceptions.ObjectDoesNotExist:
        return None


def delete_quietly(obj: pykube.objects.APIObject) -> None:
    """Deletes an object, ignoring "already gone"."""
    try:
        obj.delete()
    except pykube.exceptions.ObjectDoesNotExist:
        pass
    except pykube.exceptions.HTTPError as exc:
        if exc.code != 404:
            raise


def events_for(
    api: pykube.HTTPClient,
    namespace: str | None,
    name: str,
    kind: str | None = None,
) -> list[dict]:
    """core/v1 Events whose involvedObject is `name` (and `kind`, if given), oldest first.

    Events about cluster-scoped objects (PersistentVolumes, Nodes) are recorded in the
    "default" namespace by upstream controllers; pass namespace=None to search all.
    """
    selector = {"involvedObject.name": name}
    if kind:
        selector["involvedObject.kind"] = kind
    namespace_arg = pykube.all if namespace is None else namespace
    events = pykube.Event.objects(api, namespace=namespace_arg).filter(field_selector=selector)
    found = [event.obj for event in events]

    def stamp(event: dict) -> str:
        return (event.get("lastTimestamp") or event.get("eventTime")
                or event["metadata"].get("creationTimestamp") or "")

    return sorted(found, key=stamp)


def condition(obj: dict, type_: str) -> dict | None:
    """The status condition of the given type, or None."""
    for cond in obj.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == type_:
            return cond
    return None
