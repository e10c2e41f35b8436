"""events.EventRecorder: client-go's EventCorrelator semantics (count bumps, spam filter)."""

from __future__ import annotations

import asyncio

import pytest

from volplane.events import EventRecorder


class _Kube:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict]] = []

    async def create(self, path: str, body: dict) -> dict:
        self.calls.append(("create", path, body))
        return body

    async def merge_patch(self, path: str, body: dict) -> dict:
        self.calls.append(("patch", path, body))
        return body


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


CLAIM = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
         "metadata": {"name": "data", "namespace": "ns", "uid": "u1"}}


async def _drain(rec: EventRecorder) -> None:
    while not rec.queue.empty():
        await rec._post(*rec.queue.get_nowait())


def _run(emits: list[tuple[float, str]], burst: int = 25) -> tuple[list[bool], list]:
    kube, clock = _Kube(), _Clock()
    rec = EventRecorder(kube, "persistentvolume-controller", burst=burst, clock=clock)  # type: ignore[arg-type]
    out = []

    async def go() -> None:
        for dt, message in emits:
            clock.t += dt
            out.append(rec.emit(CLAIM, "Normal", "ExternalProvisioning", message))
            await _drain(rec)

    asyncio.run(go())
    return out, kube.calls


def test_the_same_event_on_each_sync_is_one_event_with_a_count() -> None:
    posted, calls = _run([(0, "waiting"), (15, "waiting"), (15, "waiting")])
    assert posted == [True, True, True]
    assert [c[0] for c in calls] == ["create", "patch", "patch"]
    assert [c[2]["count"] for c in calls] == [1, 2, 3]
    name = calls[0][2]["metadata"]["name"]
    assert calls[1][1] == f"/api/v1/namespaces/ns/events/{name}"


@pytest.mark.parametrize(
    ("emits", "posted"),
    [
        pytest.param([(0, "a")] * 3, [True, True, False],
                     id="spam filter: a burst per object, then nothing"),
        pytest.param([(0, "a"), (0, "b"), (0, "c")], [True, True, False],
                     id="spam filter counts every message of the object together"),
        pytest.param([(0, "a"), (0, "a"), (0, "a"), (300, "a"), (0, "a")],
                     [True, True, False, True, False],
                     id="spam filter: one more event per five minutes"),
    ],
)
def test_spam_filter_of_client_go(emits: list, posted: list) -> None:
    assert _run(emits, burst=2)[0] == posted
