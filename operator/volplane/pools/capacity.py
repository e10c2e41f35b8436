"""What the pool provisioner publishes: each pool's status, and the CSIStorageCapacity
objects kube-scheduler reads. Pure: the publisher writes what these return.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from volplane.objects import md as _meta
from volplane.objects import spec as _spec
from volplane.quantity import format_quantity

from .ledger import Ledger
from .parameters import ClassParams, ParameterError, parse_class_parameters
from .placement import (
    HOSTNAME_LABEL,
    NODE_TOPOLOGY_KEY,
    hostnames,
    missing_nodes,
    pool_capacity,
    pool_nodes,
    topology_nodes,
)
from .records import MANAGED_BY, PROVISIONER


def _q(n: int) -> str:
    """A byte count for humans: exact binary units when possible ("19Gi")."""
    return format_quantity(n)


# --- status ------------------------------------------------------------------------------


def _condition(type_: str, ok: bool, reason: str, message: str, generation: int | None,
               previous: Mapping[str, Mapping[str, Any]], now: str) -> dict[str, Any]:
    status = "True" if ok else "False"
    prev = previous.get(type_) or {}
    since = prev.get("lastTransitionTime") if prev.get("status") == status else None
    cond = {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": since or now}
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def pool_status(pool: Mapping[str, Any], sizes: Iterable[int],
                nodes: Mapping[str, Mapping[str, Any]], *, now: str) -> dict[str, Any]:
    """The status to write on a pool.

    `sizes`: the pool's allocations in bytes (from the ledger); `now`: the RFC 3339 time
    a condition that changes status gets. Conditions keep their lastTransitionTime while
    their status is unchanged, so an unchanged pool produces an identical dict (the
    caller writes only when it differs).
    """
    generation = _meta(pool).get("generation")
    sizes = list(sizes)
    capacity = pool_capacity(pool)
    allocated = sum(sizes)
    attached = pool_nodes(pool, nodes)
    missing = missing_nodes(pool, nodes)
    previous = {c.get("type"): c for c in (pool.get("status") or {}).get("conditions") or ()}
    cap = capacity or 0
    status: dict[str, Any] = {
        "capacity": _q(cap),
        "allocated": _q(allocated),
        "available": _q(max(0, cap - allocated)),
        "capacityBytes": cap,
        "allocatedBytes": allocated,
        "availableBytes": max(0, cap - allocated),
        "volumeCount": len(sizes),
        "nodeCount": len(attached),
        "nodes": attached,
    }
    if generation is not None:
        status["observedGeneration"] = generation
    if capacity is None:
        ready = (False, "InvalidCapacity", f"spec.capacity {_spec(pool).get('capacity')!r} "
                                           "is not a positive quantity")
    elif not attached:
        ready = (False, "NoNodes", "the pool is attached to no existing node")
    elif _meta(pool).get("deletionTimestamp"):
        ready = (False, "Deleting", "the pool is being deleted")
    else:
        ready = (True, "NodesReachable", f"attached to {len(attached)} node(s)")
    problems = []
    if missing:
        problems.append(("NodesMissing", f"node(s) not found: {', '.join(missing)}"))
    if capacity is not None and allocated > capacity:
        problems.append(("OverCommitted", f"{_q(allocated)} allocated exceeds the capacity "
                                          f"{_q(capacity)}"))
    degraded = ((True, problems[0][0], "; ".join(m for _, m in problems)) if problems
                else (False, "AsExpected", "all named nodes exist"))
    status["conditions"] = [
        _condition("Ready", *ready, generation, previous, now),
        _condition("Degraded", *degraded, generation, previous, now),
    ]
    return status


def status_differs(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Does writing `desired` change anything in `current` (the pool's status)?"""
    current = current or {}
    return any(current.get(k) != v for k, v in desired.items())


# --- capacity for the scheduler ------------------------------------------------------------


def capacity_object_name(pool: str, storage_class: str) -> str:
    """Deterministic CSIStorageCapacity name for (pool, class)."""
    digest = hashlib.sha256(f"{pool}\0{storage_class}".encode()).hexdigest()[:16]
    return f"sp-{digest}"


def segment_object_name(storage_class: str, segment: str) -> str:
    """Deterministic CSIStorageCapacity name for (class, node topology segment)."""
    digest = hashlib.sha256(f"{storage_class}\0{NODE_TOPOLOGY_KEY}={segment}".encode()
                            ).hexdigest()[:16]
    return f"sn-{digest}"


def _capacity_object(name: str, namespace: str, class_name: str, topology: dict[str, Any],
                     capacity: int, max_size: int,
                     annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "CSIStorageCapacity",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {MANAGED_BY: "volplane", "volplane.io/driver": PROVISIONER},
            "annotations": {**annotations, "volplane.io/storage-class": class_name},
        },
        "storageClassName": class_name,
        "nodeTopology": topology,
        "capacity": _q(capacity),
        "maximumVolumeSize": _q(max_size),
    }


def capacity_objects(pools: Mapping[str, Mapping[str, Any]],
                     classes: Mapping[str, Mapping[str, Any]], ledger: Ledger,
                     nodes: Mapping[str, Mapping[str, Any]],
                     namespace: str) -> dict[str, dict[str, Any]]:
    """The CSIStorageCapacity objects to publish, as external-provisioner lays them out
    for a driver with topology: one per (class, topology segment).

    A node where the node plugin registered carries the segment label
    ``topology.pool.volplane.io/node=<node>``: its object for a class selects exactly that
    label (matchLabels), with capacity = the free space of every pool the class may use
    that reaches the node, and maximumVolumeSize = the largest one (a volume lives in one
    pool). Nodes without the label (no node plugin there, e.g. kwok's) are published per
    (pool, class), selected by hostname, with the pool's free space. Classes with invalid
    parameters and pools without nodes or with an invalid capacity get none: the
    scheduler then sees no capacity there, which is the truth.
    """
    out: dict[str, dict[str, Any]] = {}
    for class_name in sorted(classes):
        sc = classes[class_name]
        if sc.get("provisioner") != PROVISIONER:
            continue
        try:
            params = parse_class_parameters(sc.get("parameters"))
        except ParameterError:
            continue
        out.update(_class_objects(class_name, sc, params, pools, ledger, nodes, namespace))
    return out


def _class_objects(class_name: str, sc: Mapping[str, Any], params: ClassParams,
                   pools: Mapping[str, Mapping[str, Any]], ledger: Ledger,
                   nodes: Mapping[str, Mapping[str, Any]],
                   namespace: str) -> dict[str, dict[str, Any]]:
    """One class's objects: per (pool, class) for unlabelled nodes, per segment else."""
    out: dict[str, dict[str, Any]] = {}
    segments: dict[str, dict[str, int]] = {}  # segment -> {pool: free bytes}
    for pool_name in sorted(pools):
        pool = pools[pool_name]
        if not params.selects(pool) or _meta(pool).get("deletionTimestamp"):
            continue
        capacity = pool_capacity(pool)
        if capacity is None:
            continue
        usable = topology_nodes(pool_nodes(pool, nodes), nodes, sc.get("allowedTopologies"))
        free = ledger.available(pool_name, capacity)
        unsegmented = []
        for n in usable:
            segment = (_meta(nodes.get(n) or {}).get("labels") or {}).get(NODE_TOPOLOGY_KEY)
            if segment:
                segments.setdefault(segment, {})[pool_name] = free
            else:
                unsegmented.append(n)
        if unsegmented:
            name = capacity_object_name(pool_name, class_name)
            out[name] = _capacity_object(
                name, namespace, class_name,
                {"matchExpressions": [{"key": HOSTNAME_LABEL, "operator": "In",
                                       "values": hostnames(unsegmented, nodes)}]},
                free, free, {"volplane.io/pool": pool_name})
    for segment in sorted(segments):
        frees = segments[segment]
        name = segment_object_name(class_name, segment)
        out[name] = _capacity_object(
            name, namespace, class_name, {"matchLabels": {NODE_TOPOLOGY_KEY: segment}},
            sum(frees.values()), max(frees.values()),
            {"volplane.io/pools": ",".join(sorted(frees))})
    return out
