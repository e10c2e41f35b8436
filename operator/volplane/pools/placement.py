"""Which pool a claim goes to, and which nodes a pool reaches: pure.

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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from volplane.node.backing import reported_capacity
from volplane.objects import md as _meta
from volplane.objects import spec as _spec
from volplane.quantity import format_quantity, parse_quantity
from volplane.selectors import match_label_selector

from .ledger import Ledger
from .parameters import SPREAD, ClassParams

HOSTNAME_LABEL = "kubernetes.io/hostname"
# The topology segment the CSI node plugin reports in NodeGetInfo (node/service.py's
# TOPOLOGY_KEY); the kubelet labels a node with it when the plugin registers there.
NODE_TOPOLOGY_KEY = "topology.pool.volplane.io/node"
DEFAULT_ACCESS_MODES = ("ReadWriteOnce", "ReadWriteOncePod")


def _q(n: int) -> str:
    """A byte count for humans: exact binary units when possible ("19Gi")."""
    return format_quantity(n)


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


def hostnames(node_names: Iterable[str], nodes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """kubernetes.io/hostname label values of the nodes (the name when unlabelled)."""
    out = set()
    for n in node_names:
        labels = _meta(nodes.get(n) or {}).get("labels") or {}
        out.add(labels.get(HOSTNAME_LABEL) or n)
    return sorted(out)


def node_affinity(node_names: Iterable[str],
                  nodes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A PV spec.nodeAffinity that admits exactly these nodes (by hostname label)."""
    return {"required": {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": HOSTNAME_LABEL, "operator": "In", "values": hostnames(node_names, nodes)}]}]}}


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
             ledger: Ledger, node: str | None,
             allowed_topologies: Sequence[Mapping[str, Any]] | None,
             nodes: Mapping[str, Mapping[str, Any]]) -> tuple[str | None, list[str], int]:
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
    fits: list[tuple[tuple[int | str, ...], str, list[str], int]] = []
    rejected: list[tuple[str, str]] = []
    for name, pool in selected:
        why, usable, free = _why_not(name, pool, claim_size, modes, ledger, node,
                                     allowed_topologies, nodes)
        if why is not None:
            rejected.append((name, why))
            continue
        key: tuple[int | str, ...]
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


# --- an allocation record made before ----------------------------------------------------


def stale_record(record: Mapping[str, Any], pools: Mapping[str, Mapping[str, Any]],
                 nodes: Mapping[str, Mapping[str, Any]], *,
                 allowed_topologies: Sequence[Mapping[str, Any]] | None = None,
                 node: str | None = None) -> str | None:
    """Why the allocation record an earlier attempt made for a claim can no longer give it
    a volume, or None when its pool still can.

    The provisioner reuses a claim's record rather than choosing again (choosing again
    could count the claim twice). But when the record's pool is gone, reaches no
    existing node (in the class's allowedTopologies) any more, or (WaitForFirstConsumer)
    does not reach the node the scheduler selected now, a PV made from it would be of
    no use: with no PV made from it yet, the record is freed and the claim is placed
    afresh. (Typically: the operator died between the record and the PV, and the
    selected node, the pool's only one, was deleted meanwhile: without this the record
    held its space and the claim stayed pinned to a node that is gone.)
    """
    pool_name = str((record.get("spec") or {}).get("pool") or "")
    pool = pools.get(pool_name)
    if pool is None:
        return f'its StoragePool "{pool_name}" does not exist'
    usable = topology_nodes(pool_nodes(pool, nodes), nodes, allowed_topologies)
    if not usable:
        return (f'its StoragePool "{pool_name}" is attached to no existing node (in the '
                "class's allowedTopologies)")
    if node is not None and node not in usable:
        return f'its StoragePool "{pool_name}" does not reach the selected node "{node}"'
    return None
