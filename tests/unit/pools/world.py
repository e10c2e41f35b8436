"""Builders shared by the pool driver's unit tests."""

from __future__ import annotations

from volplane.pools.ledger import Ledger

GI = 1024**3


def node(name: str, zone: str = "zone-a", **labels) -> dict:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                                  "topology.kubernetes.io/zone": zone,
                                                  **labels}}}


NODES = {n["metadata"]["name"]: n for n in (
    node("n0", "zone-a", disk="ssd"), node("n1", "zone-b", disk="ssd"),
    node("n2", "zone-a"), node("n3", "zone-b"))}


def pool(name: str, capacity="20Gi", names=("n0",), selector=None, modes=None,
         labels=None, params=None, **extra) -> dict:
    nodes: dict = {}
    if names:
        nodes["names"] = list(names)
    if selector is not None:
        nodes["selector"] = selector
    spec: dict = {"capacity": capacity, "nodes": nodes}
    if modes is not None:
        spec["accessModes"] = list(modes)
    if params is not None:
        spec["parameters"] = params
    md: dict = {"name": name, "labels": labels or {}, **extra}
    return {"apiVersion": "volplane.io/v1alpha1", "kind": "StoragePool", "metadata": md,
            "spec": spec}


def pools(*ps: dict) -> dict:
    return {p["metadata"]["name"]: p for p in ps}


RWO = ["ReadWriteOnce"]


def ledger_with(**allocated_gi: int) -> Ledger:
    led = Ledger()
    for i, (p, gi) in enumerate(allocated_gi.items()):
        if gi:
            led.observe(f"pvc-{i}", p, gi * GI)
    return led
