"""The pool provisioner's decision layer: pure functions over plain Kubernetes dicts.

Nothing here performs I/O. The controller (``provisioner.py``) gathers pools, nodes,
classes and the allocation records from its cache, asks these functions what to do,
and carries the answer out.

StorageClass parameters (``provisioner: pool.volplane.io``)
-----------------------------------------------------------

==============================  ===============================================  ===========
parameter                       meaning                                          default
==============================  ===============================================  ===========
``pool``                        comma-separated StoragePool names the class may  any pool
                                use
``poolSelector``                label selector over the pools' ``metadata.labels``  any pool
                                (``k=v``, ``k!=v``, ``k``, ``!k``,
                                ``k in (a,b)``, ``k notin (a,b)``; ANDed)
``media``, ``tier``             must equal the pool's ``spec.parameters.media``  -
                                / ``.tier``
``match.<key>``                 must equal the pool's ``spec.parameters.<key>``  -
``placement``                   ``BestFit``: the fitting pool with the least     ``BestFit``
                                free space (packs pools, keeps big holes for big
                                claims); ``Spread``: the one with the most free
                                space (ties: fewer volumes)
``csi.storage.k8s.io/fstype``   filesystem for Filesystem volumes (``ext2``,     none
                                ``ext3``, ``ext4``, ``xfs``, ``btrfs``), written
                                to the PV's ``csi.fsType``
==============================  ===============================================  ===========

Anything else is rejected with a ``ParameterError`` naming the parameter, and the
claim gets a ``ProvisioningFailed`` event: a typo must not silently select every pool.

Choosing a pool
---------------

A pool qualifies for a claim when, in this order (the first failed check is the reason
reported for that pool): it is selected by the class parameters; it is not being
deleted; its capacity is valid; it serves every access mode the claim asks for; it is
attached to at least one existing node; (WaitForFirstConsumer) it is attached to the
node the scheduler selected; at least one of its nodes lies in the class's
``allowedTopologies``; and its free space (capacity minus the ledger's allocations)
holds the claim. Among qualifying pools the placement policy picks one, ties broken by
name, so the choice is deterministic. ``choose_pool`` never returns a pool without room:
with the caller reserving in the ledger right after choosing (no ``await`` between),
the sum of the allocations on a pool never exceeds its capacity.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from volplane.node.backing import reported_capacity
from volplane.quantity import format_quantity, parse_quantity
from volplane.selectors import match_label_selector

__all__ = [
    "API_VERSION",
    "BEST_FIT",
    "PROVISIONER",
    "SPREAD",
    "Allocation",
    "Choice",
    "ClassParams",
    "Ledger",
    "ParameterError",
    "capacity_object_name",
    "segment_object_name",
    "capacity_objects",
    "choose_pool",
    "node_affinity",
    "parse_class_parameters",
    "parse_selector",
    "pool_capacity",
    "pool_nodes",
    "pool_status",
    "topology_nodes",
]

PROVISIONER = "pool.volplane.io"
GROUP = "volplane.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
HOSTNAME_LABEL = "kubernetes.io/hostname"
# The topology segment the CSI node plugin reports in NodeGetInfo (node/service.py's
# TOPOLOGY_KEY); the kubelet labels a node with it when the plugin registers there.
NODE_TOPOLOGY_KEY = "topology.pool.volplane.io/node"
DEFAULT_ACCESS_MODES = ("ReadWriteOnce", "ReadWriteOncePod")
BEST_FIT = "BestFit"
SPREAD = "Spread"
PLACEMENTS = (BEST_FIT, SPREAD)
FSTYPE_PARAM = "csi.storage.k8s.io/fstype"
FS_TYPES = ("ext2", "ext3", "ext4", "xfs", "btrfs")
MATCH_PREFIX = "match."
NAMED_MATCH_PARAMS = ("media", "tier")
KNOWN_PARAMS = ("pool", "poolSelector", *NAMED_MATCH_PARAMS, f"{MATCH_PREFIX}<key>",
                "placement", FSTYPE_PARAM)
MANAGED_BY = "app.kubernetes.io/managed-by"


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _spec(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("spec") or {}


def _name(obj: Mapping[str, Any]) -> str:
    return _meta(obj).get("name", "")


def _q(n: int) -> str:
    """A byte count for humans: exact binary units when possible ("19Gi")."""
    return format_quantity(n)


# --- class parameters --------------------------------------------------------------------


class ParameterError(ValueError):
    """A StorageClass parameter that is unknown or has a bad value."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f'invalid StorageClass parameter "{field}": {message}')


_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_LABEL_KEY_RE = re.compile(rf"^({_DNS_SUBDOMAIN}/)?{_LABEL_NAME}$")
_LABEL_VALUE_RE = re.compile(rf"^({_LABEL_NAME})?$")
_SET_RE = re.compile(r"^(?P<key>[^\s!=()]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")


def _check_key(field: str, key: str) -> str:
    prefix, _, _ = key.rpartition("/")
    if not _LABEL_KEY_RE.match(key) or len(prefix) > 253:
        raise ParameterError(field, f"{key!r} is not a valid label key")
    return key


def _check_value(field: str, value: str) -> str:
    if not _LABEL_VALUE_RE.match(value):
        raise ParameterError(field, f"{value!r} is not a valid label value")
    return value


def _split_requirements(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_selector(text: str, field: str = "poolSelector") -> dict:
    """Parse a kubectl-style label selector string into a ``metav1.LabelSelector`` dict.

    Supports ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, ``k in (a,b)``,
    ``k notin (a,b)``, comma-separated (ANDed). Raises ParameterError(field, ...).
    """
    if not text.strip():
        raise ParameterError(field, "must not be empty")
    labels: dict[str, str] = {}
    exprs: list[dict] = []
    for raw in _split_requirements(text):
        part = raw.strip()
        if not part:
            raise ParameterError(field, f"empty requirement in {text!r}")
        m = _SET_RE.match(part)
        if m:
            values = [v.strip() for v in m.group("values").split(",")]
            if not values or any(v == "" for v in values):
                raise ParameterError(field, f"{part!r}: empty value in the set")
            exprs.append({"key": _check_key(field, m.group("key")),
                          "operator": "In" if m.group("op") == "in" else "NotIn",
                          "values": sorted({_check_value(field, v) for v in values})})
        elif "!=" in part:
            key, _, value = part.partition("!=")
            exprs.append({"key": _check_key(field, key.strip()), "operator": "NotIn",
                          "values": [_check_value(field, value.strip())]})
        elif "=" in part:
            key, _, value = part.partition("==") if "==" in part else part.partition("=")
            key, value = key.strip(), value.strip()
            _check_key(field, key)
            if key in labels and labels[key] != value:
                raise ParameterError(field, f"{key!r} is required to equal two values")
            labels[key] = _check_value(field, value)
        elif part.startswith("!"):
            exprs.append({"key": _check_key(field, part[1:].strip()),
                          "operator": "DoesNotExist"})
        elif re.search(r"[\s()]", part):
            raise ParameterError(field, f"cannot parse requirement {part!r}")
        else:
            exprs.append({"key": _check_key(field, part), "operator": "Exists"})
    selector: dict = {}
    if labels:
        selector["matchLabels"] = labels
    if exprs:
        selector["matchExpressions"] = exprs
    return selector


@dataclass(frozen=True)
class ClassParams:
    """What a StorageClass asks of a pool, parsed from its parameters."""

    pools: tuple[str, ...] = ()
    pool_selector: Mapping[str, Any] | None = None
    pool_selector_text: str = ""
    match: tuple[tuple[str, str], ...] = ()  # (spec.parameters key, value)
    placement: str = BEST_FIT
    fs_type: str | None = None

    def selects(self, pool: Mapping[str, Any]) -> bool:
        """Does the class allow this pool (name, labels, spec.parameters)?"""
        if self.pools and _name(pool) not in self.pools:
            return False
        if self.pool_selector and not match_label_selector(
                self.pool_selector, _meta(pool).get("labels") or {}):
            return False
        params = _spec(pool).get("parameters") or {}
        return all(params.get(k) == v for k, v in self.match)

    def describe(self) -> str:
        parts = []
        if self.pools:
            parts.append(f"pool={','.join(self.pools)}")
        if self.pool_selector_text:
            parts.append(f"poolSelector={self.pool_selector_text}")
        for k, v in self.match:
            parts.append(f"{k if k in NAMED_MATCH_PARAMS else MATCH_PREFIX + k}={v}")
        return ", ".join(parts) or "any pool"


_POOL_NAME_RE = re.compile(rf"^{_DNS_SUBDOMAIN}$")


def parse_class_parameters(params: Mapping[str, Any] | None) -> ClassParams:
    """Validate a StorageClass's parameters; raise ParameterError naming the bad one."""
    pools: tuple[str, ...] = ()
    selector: dict | None = None
    selector_text = ""
    match: dict[str, str] = {}
    placement = BEST_FIT
    fs_type: str | None = None
    for key in sorted(params or {}):
        value = (params or {})[key]
        if not isinstance(value, str):
            raise ParameterError(key, f"value must be a string, got {value!r}")
        if key == "pool":
            names = [n.strip() for n in value.split(",")]
            for n in names:
                if not n or len(n) > 253 or not _POOL_NAME_RE.match(n):
                    raise ParameterError(key, f"{n!r} is not a valid StoragePool name")
            pools = tuple(dict.fromkeys(names))
        elif key == "poolSelector":
            selector = parse_selector(value, key)
            selector_text = value.strip()
        elif key in NAMED_MATCH_PARAMS or key.startswith(MATCH_PREFIX):
            pkey = key[len(MATCH_PREFIX):] if key.startswith(MATCH_PREFIX) else key
            if not pkey or len(pkey) > 63 or not re.match(rf"^{_LABEL_NAME}$", pkey):
                raise ParameterError(key, f"{pkey!r} is not a valid pool parameter name")
            if not value or len(value) > 63:
                raise ParameterError(key, "value must be 1 to 63 characters")
            if pkey in match and match[pkey] != value:
                raise ParameterError(key, f"conflicts with another parameter for {pkey!r}")
            match[pkey] = value
        elif key == "placement":
            if value not in PLACEMENTS:
                raise ParameterError(key, f"{value!r} is not one of {', '.join(PLACEMENTS)}")
            placement = value
        elif key == FSTYPE_PARAM:
            if value not in FS_TYPES:
                raise ParameterError(key, f"{value!r} is not one of {', '.join(FS_TYPES)}")
            fs_type = value
        else:
            raise ParameterError(key, "unknown parameter (accepted: "
                                      f"{', '.join(KNOWN_PARAMS)})")
    return ClassParams(pools=pools, pool_selector=selector, pool_selector_text=selector_text,
                       match=tuple(sorted(match.items())), placement=placement,
                       fs_type=fs_type)


# --- pools and nodes ---------------------------------------------------------------------


def pool_capacity(pool: Mapping[str, Any]) -> int | None:
    """spec.capacity in bytes, or None if missing/invalid/not positive; for a pool with
    backing storage, at most what its node agent reports the backing really offers
    (status.backing.capacityBytes, see volplane.node.backing)."""
    raw = _spec(pool).get("capacity")
    if raw is None:
        return None
    try:
        n = parse_quantity(raw)
    except ValueError:
        return None
    if n <= 0:
        return None
    real = reported_capacity(pool)
    return n if real is None else min(n, real)


def _node_deleting(node: Mapping[str, Any]) -> bool:
    return bool(_meta(node).get("deletionTimestamp"))


def pool_nodes(pool: Mapping[str, Any], nodes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The existing nodes the pool is attached to: names ∪ selector matches, sorted.

    Nodes being deleted do not count. An empty selector selects nothing here (the CRD
    requires names or a non-empty selector; "every node" must be said explicitly, e.g.
    with an Exists expression).
    """
    spec = _spec(pool).get("nodes") or {}
    out = {n for n in spec.get("names") or () if n in nodes and not _node_deleting(nodes[n])}
    selector = spec.get("selector")
    if selector and (selector.get("matchLabels") or selector.get("matchExpressions")):
        for name, node in nodes.items():
            if _node_deleting(node):
                continue
            try:
                if match_label_selector(selector, _meta(node).get("labels") or {}):
                    out.add(name)
            except ValueError:
                return sorted(out)  # malformed selector (the CRD prevents it): names only
    return sorted(out)


def missing_nodes(pool: Mapping[str, Any], nodes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Nodes named in spec.nodes.names that do not exist (or are being deleted)."""
    names = (_spec(pool).get("nodes") or {}).get("names") or ()
    return sorted(n for n in names if n not in nodes or _node_deleting(nodes[n]))


def _topology_term_matches(term: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    exprs = term.get("matchLabelExpressions") or ()
    return all(labels.get(e.get("key", "")) in (e.get("values") or ()) for e in exprs)


def topology_nodes(node_names: Iterable[str], nodes: Mapping[str, Mapping[str, Any]],
                   allowed_topologies: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """The nodes among node_names that lie in a class's allowedTopologies (ORed terms)."""
    names = list(node_names)
    if not allowed_topologies:
        return names
    out = []
    for n in names:
        labels = _meta(nodes.get(n) or {}).get("labels") or {}
        if any(_topology_term_matches(t, labels) for t in allowed_topologies):
            out.append(n)
    return out


def _hostnames(node_names: Iterable[str], nodes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """kubernetes.io/hostname label values of the nodes (the name when unlabelled)."""
    out = set()
    for n in node_names:
        labels = _meta(nodes.get(n) or {}).get("labels") or {}
        out.add(labels.get(HOSTNAME_LABEL) or n)
    return sorted(out)


def node_affinity(node_names: Iterable[str], nodes: Mapping[str, Mapping[str, Any]]) -> dict:
    """A PV spec.nodeAffinity that admits exactly these nodes (by hostname label)."""
    return {"required": {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": HOSTNAME_LABEL, "operator": "In", "values": _hostnames(node_names, nodes)}]}]}}


# --- the ledger --------------------------------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    """One volume's share of a pool.

    ``reserved``: taken in memory, the durable record's write is in flight (or the
    record is being grown). ``base`` is what the record says meanwhile (None: no record
    yet), restored by ``cancel`` when the write fails.
    """

    pool: str
    size: int
    reserved: bool = False
    base: int | None = None


class Ledger:
    """Allocations by name (= PV name), with running totals per pool.

    Fed from the StorageAllocation records (``observe`` / ``release``) and by the
    provisioner's own reservations (``reserve`` / ``grow``, undone by ``cancel``). A
    reservation counts at once, so a second claim decided before the record lands
    cannot take the same space; a record observed while a larger reservation is in
    flight does not shrink it.
    """

    def __init__(self) -> None:
        self._items: dict[str, Allocation] = {}
        self._totals: dict[str, list[int]] = {}  # pool -> [bytes, count]

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str) -> Allocation | None:
        return self._items.get(name)

    def items(self) -> list[tuple[str, Allocation]]:
        return list(self._items.items())

    def pools(self) -> set[str]:
        return {p for p, (b, c) in self._totals.items() if c}

    def allocated(self, pool: str) -> int:
        return self._totals.get(pool, (0, 0))[0]

    def count(self, pool: str) -> int:
        return self._totals.get(pool, (0, 0))[1]

    def sizes(self, pool: str) -> list[int]:
        return [a.size for a in self._items.values() if a.pool == pool]

    def available(self, pool: str, capacity: int) -> int:
        return max(0, capacity - self.allocated(pool))

    def _put(self, name: str, alloc: Allocation | None) -> None:
        old = self._items.pop(name, None)
        if old is not None:
            t = self._totals[old.pool]
            t[0] -= old.size
            t[1] -= 1
            if not t[1]:
                del self._totals[old.pool]
        if alloc is not None:
            self._items[name] = alloc
            t = self._totals.setdefault(alloc.pool, [0, 0])
            t[0] += alloc.size
            t[1] += 1

    def observe(self, name: str, pool: str, size: int) -> None:
        """A durable record says `name` holds `size` bytes of `pool`."""
        cur = self._items.get(name)
        if cur is not None and cur.reserved and cur.pool == pool and cur.size > size:
            self._put(name, Allocation(pool, cur.size, True, size))  # grow in flight
            return
        self._put(name, Allocation(pool, size))

    def release(self, name: str) -> Allocation | None:
        """The record is gone: free its space."""
        cur = self._items.get(name)
        self._put(name, None)
        return cur

    def reserve(self, name: str, pool: str, size: int, capacity: int) -> bool:
        """Take `size` bytes of `pool` for `name` if they are free (idempotent)."""
        cur = self._items.get(name)
        if cur is not None:
            return cur.pool == pool and cur.size >= size
        if size <= 0 or self.allocated(pool) + size > capacity:
            return False
        self._put(name, Allocation(pool, size, True, None))
        return True

    def grow(self, name: str, size: int, capacity: int) -> bool:
        """Grow `name` to `size` bytes if its pool has room for the difference."""
        cur = self._items.get(name)
        if cur is None:
            return False
        if size <= cur.size:
            return True
        if self.allocated(cur.pool) - cur.size + size > capacity:
            return False
        base = cur.base if cur.reserved else cur.size
        self._put(name, Allocation(cur.pool, size, True, base))
        return True

    def cancel(self, name: str) -> None:
        """A reservation's write failed: go back to what the record says."""
        cur = self._items.get(name)
        if cur is None or not cur.reserved:
            return
        self._put(name, None if cur.base is None else Allocation(cur.pool, cur.base))


# --- choosing a pool -----------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """choose_pool's answer: a pool and the nodes the volume may be used on, or None.

    ``reason`` explains the choice, or (pool None) why no pool fits, pool by pool;
    ``rejected`` holds (pool, why) for every selected pool that did not fit.
    """

    pool: str | None
    reason: str
    nodes: tuple[str, ...] = ()
    rejected: tuple[tuple[str, str], ...] = ()
    available: int = 0


def _pool_modes(pool: Mapping[str, Any]) -> list[str]:
    return list(_spec(pool).get("accessModes") or DEFAULT_ACCESS_MODES)


def _why_not(name: str, pool: Mapping[str, Any], size: int, modes: Iterable[str],
             ledger: Ledger, node: str | None, allowed_topologies, nodes
             ) -> tuple[str | None, list[str], int]:
    """(reason the pool cannot take the claim or None, usable nodes, free bytes)."""
    if _meta(pool).get("deletionTimestamp"):
        return f'pool "{name}" is being deleted', [], 0
    capacity = pool_capacity(pool)
    if capacity is None:
        return f'pool "{name}" has an invalid capacity {_spec(pool).get("capacity")!r}', [], 0
    served = _pool_modes(pool)
    missing = [m for m in modes if m not in served]
    if missing:
        return (f'pool "{name}" does not serve {", ".join(sorted(set(missing)))} '
                f'(serves {", ".join(served)})'), [], 0
    attached = pool_nodes(pool, nodes)
    if not attached:
        return f'pool "{name}" is attached to no existing node', [], 0
    if node is not None and node not in attached:
        return f'pool "{name}" is not attached to node "{node}"', [], 0
    usable = topology_nodes(attached, nodes, allowed_topologies)
    if not usable:
        return f'pool "{name}" has no node in the class\'s allowedTopologies', [], 0
    if node is not None and node not in usable:
        return f'node "{node}" is not in the class\'s allowedTopologies', [], 0
    allocated = ledger.allocated(name)
    free = max(0, capacity - allocated)
    if size > free:
        return (f'pool "{name}" full: {_q(allocated)} of {_q(capacity)} allocated, '
                f'{_q(free)} free < {_q(size)} requested'), usable, free
    return None, usable, free


def choose_pool(claim_size: int, access_modes: Iterable[str], params: ClassParams,
                pools: Mapping[str, Mapping[str, Any]], ledger: Ledger, *,
                node: str | None = None,
                allowed_topologies: Sequence[Mapping[str, Any]] | None = None,
                nodes: Mapping[str, Mapping[str, Any]] | None = None) -> Choice:
    """Pick the pool for a claim of `claim_size` bytes, or say why none fits.

    `node`: the scheduler's selected node (WaitForFirstConsumer). `nodes`: every Node by
    name. The returned pool always has room: ledger.allocated + claim_size <= capacity.
    """
    nodes = nodes or {}
    modes = list(access_modes or ())
    selected = [(name, pools[name]) for name in sorted(pools) if params.selects(pools[name])]
    if not selected:
        return Choice(None, f"no StoragePool matches the class parameters ({params.describe()})")
    fits: list[tuple[tuple, str, list[str], int]] = []
    rejected: list[tuple[str, str]] = []
    for name, pool in selected:
        why, usable, free = _why_not(name, pool, claim_size, modes, ledger, node,
                                     allowed_topologies, nodes)
        if why is not None:
            rejected.append((name, why))
            continue
        if params.placement == SPREAD:
            key = (-free, ledger.count(name), name)
        else:
            key = (free, name)
        fits.append((key, name, usable, free))
    if not fits:
        where = f' on node "{node}"' if node else ""
        return Choice(None, f"no StoragePool can hold {_q(claim_size)}{where}: "
                            + "; ".join(why for _, why in rejected), rejected=tuple(rejected))
    fits.sort()
    _, name, usable, free = fits[0]
    return Choice(name, f'pool "{name}" chosen ({params.placement}): {_q(free)} free, '
                        f'{_q(claim_size)} requested', nodes=tuple(usable),
                  rejected=tuple(rejected), available=free)


# --- status ------------------------------------------------------------------------------


def _condition(type_: str, ok: bool, reason: str, message: str, generation: int | None,
               previous: Mapping[str, Mapping[str, Any]], now: str) -> dict:
    status = "True" if ok else "False"
    prev = previous.get(type_) or {}
    since = prev.get("lastTransitionTime") if prev.get("status") == status else None
    cond = {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": since or now}
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def _sizes(pool_name: str, allocations: Iterable[Any]) -> list[int]:
    out = []
    for a in allocations:
        if isinstance(a, Mapping):
            spec = _spec(a)
            if spec.get("pool") == pool_name:
                out.append(int(spec.get("sizeBytes") or 0))
        else:
            out.append(int(a))
    return out


def pool_status(pool: Mapping[str, Any], allocations: Iterable[Any],
                nodes: Mapping[str, Mapping[str, Any]], *, now: str | None = None) -> dict:
    """The status to write on a pool.

    `allocations`: this pool's allocation sizes in bytes (ints), or StorageAllocation
    records (those of other pools are skipped). Conditions keep their
    lastTransitionTime while their status is unchanged, so an unchanged pool produces an
    identical dict (the caller writes only when it differs).
    """
    now = now or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    name = _name(pool)
    generation = _meta(pool).get("generation")
    sizes = _sizes(name, allocations)
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


def _capacity_object(name: str, namespace: str, class_name: str, topology: dict,
                     capacity: int, max_size: int, annotations: dict) -> dict:
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
                     nodes: Mapping[str, Mapping[str, Any]], namespace: str) -> dict[str, dict]:
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
    out: dict[str, dict] = {}
    for class_name in sorted(classes):
        sc = classes[class_name]
        if sc.get("provisioner") != PROVISIONER:
            continue
        try:
            params = parse_class_parameters(sc.get("parameters"))
        except ParameterError:
            continue
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
                                           "values": _hostnames(unsegmented, nodes)}]},
                    free, free, {"volplane.io/pool": pool_name})
        for segment in sorted(segments):
            frees = segments[segment]
            name = segment_object_name(class_name, segment)
            out[name] = _capacity_object(
                name, namespace, class_name, {"matchLabels": {NODE_TOPOLOGY_KEY: segment}},
                sum(frees.values()), max(frees.values()),
                {"volplane.io/pools": ",".join(sorted(frees))})
    return out
