"""StorageClass parameters of ``provisioner: pool.volplane.io``: parsed and validated,
pure.

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
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from volplane.objects import md as _meta
from volplane.objects import name as _name
from volplane.objects import spec as _spec
from volplane.selectors import match_label_selector

BEST_FIT = "BestFit"
SPREAD = "Spread"
PLACEMENTS = (BEST_FIT, SPREAD)
FSTYPE_PARAM = "csi.storage.k8s.io/fstype"
FS_TYPES = ("ext2", "ext3", "ext4", "xfs", "btrfs")
MATCH_PREFIX = "match."
NAMED_MATCH_PARAMS = ("media", "tier")
KNOWN_PARAMS = ("pool", "poolSelector", *NAMED_MATCH_PARAMS, f"{MATCH_PREFIX}<key>",
                "placement", FSTYPE_PARAM)


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
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
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


def _requirement(part: str, field: str, labels: dict[str, str],
                 exprs: list[dict[str, Any]]) -> None:
    """One requirement of a selector string, into `labels` or `exprs`."""
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
        exprs.append({"key": _check_key(field, part[1:].strip()), "operator": "DoesNotExist"})
    elif re.search(r"[\s()]", part):
        raise ParameterError(field, f"cannot parse requirement {part!r}")
    else:
        exprs.append({"key": _check_key(field, part), "operator": "Exists"})


def parse_selector(text: str, field: str = "poolSelector") -> dict[str, Any]:
    """Parse a kubectl-style label selector string into a ``metav1.LabelSelector`` dict.

    Supports ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, ``k in (a,b)``,
    ``k notin (a,b)``, comma-separated (ANDed). Raises ParameterError(field, ...).
    """
    if not text.strip():
        raise ParameterError(field, "must not be empty")
    labels: dict[str, str] = {}
    exprs: list[dict[str, Any]] = []
    for raw in _split_requirements(text):
        part = raw.strip()
        if not part:
            raise ParameterError(field, f"empty requirement in {text!r}")
        _requirement(part, field, labels, exprs)
    selector: dict[str, Any] = {}
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


def _pool_names(key: str, value: str) -> tuple[str, ...]:
    names = [n.strip() for n in value.split(",")]
    for n in names:
        if not n or len(n) > 253 or not _POOL_NAME_RE.match(n):
            raise ParameterError(key, f"{n!r} is not a valid StoragePool name")
    return tuple(dict.fromkeys(names))


def _match_param(key: str, value: str, match: dict[str, str]) -> None:
    pkey = key[len(MATCH_PREFIX):] if key.startswith(MATCH_PREFIX) else key
    if not pkey or len(pkey) > 63 or not re.match(rf"^{_LABEL_NAME}$", pkey):
        raise ParameterError(key, f"{pkey!r} is not a valid pool parameter name")
    if not value or len(value) > 63:
        raise ParameterError(key, "value must be 1 to 63 characters")
    if pkey in match and match[pkey] != value:
        raise ParameterError(key, f"conflicts with another parameter for {pkey!r}")
    match[pkey] = value


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ParameterError(key, f"{value!r} is not one of {', '.join(allowed)}")
    return value


def parse_class_parameters(params: Mapping[str, Any] | None) -> ClassParams:
    """Validate a StorageClass's parameters; raise ParameterError naming the bad one."""
    out: dict[str, Any] = {}
    match: dict[str, str] = {}
    for key in sorted(params or {}):
        value = (params or {})[key]
        if not isinstance(value, str):
            raise ParameterError(key, f"value must be a string, got {value!r}")
        if key == "pool":
            out["pools"] = _pool_names(key, value)
        elif key == "poolSelector":
            out["pool_selector"] = parse_selector(value, key)
            out["pool_selector_text"] = value.strip()
        elif key in NAMED_MATCH_PARAMS or key.startswith(MATCH_PREFIX):
            _match_param(key, value, match)
        elif key == "placement":
            out["placement"] = _one_of(key, value, PLACEMENTS)
        elif key == FSTYPE_PARAM:
            out["fs_type"] = _one_of(key, value, FS_TYPES)
        else:
            raise ParameterError(key, "unknown parameter (accepted: "
                                      f"{', '.join(KNOWN_PARAMS)})")
    return ClassParams(match=tuple(sorted(match.items())), **out)
