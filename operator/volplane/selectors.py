"""Label selectors and PV node affinity, evaluated on plain Kubernetes JSON dicts.

Two different selector dialects live in the Kubernetes API:

* ``metav1.LabelSelector`` (a claim's ``spec.selector``): ``matchLabels`` plus
  ``matchExpressions`` with In / NotIn / Exists / DoesNotExist; every requirement
  must hold (AND). A missing (None) or empty selector selects everything.
* ``core/v1.NodeSelector`` (a PV's ``spec.nodeAffinity.required``): a list of
  ``nodeSelectorTerms`` that are ORed; inside a term, ``matchExpressions`` (on node
  labels) and ``matchFields`` (on ``metadata.name``) are ANDed. Operators add Gt/Lt
  (integer comparison). A term with no requirements matches nothing, and so does a
  term with a malformed requirement (upstream turns the parse error into "no match").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["match_label_selector", "match_node_affinity", "match_node_selector_terms"]


def _requirement_holds(operator: str, key: str, values: Sequence[str],
                       labels: Mapping[str, Any]) -> bool:
    """Evaluate one set-based requirement (In/NotIn/Exists/DoesNotExist) on labels."""
    if operator == "In":
        return key in labels and labels[key] in values
    if operator == "NotIn":
        return key not in labels or labels[key] not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    raise ValueError(f"invalid label selector operator {operator!r} for key {key!r}")


def match_label_selector(selector: Mapping[str, Any] | None,
                         labels: Mapping[str, Any] | None) -> bool:
    """Return True when ``labels`` satisfy a ``metav1.LabelSelector`` dict.

    ``None`` and ``{}`` select everything (as a claim's absent or empty selector does).
    Raises ValueError for an unknown operator: the API server's validation rejects such
    selectors, so seeing one means the input was not a real Kubernetes object.
    """
    if not selector:
        return True
    labels = labels or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or ():
        values = expr.get("values") or ()
        if not _requirement_holds(expr.get("operator", ""), expr.get("key", ""), values, labels):
            return False
    return True


def _parse_int(text: Any) -> int | None:
    """Parse a base-10 integer the way Go's strconv.ParseInt does, or return None."""
    if not isinstance(text, str):
        return None
    try:
        return int(text, 10)
    except ValueError:
        return None


def _node_requirement_holds(expr: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Evaluate one NodeSelectorRequirement; malformed requirements never match."""
    operator = expr.get("operator", "")
    key = expr.get("key", "")
    values = list(expr.get("values") or ())
    if operator in ("In", "NotIn"):
        if not values:
            return False  # upstream: "values set must be non-empty" -> term fails
        return _requirement_holds(operator, key, values, labels)
    if operator in ("Exists", "DoesNotExist"):
        if values:
            return False  # upstream: "values set must be empty" -> term fails
        return _requirement_holds(operator, key, values, labels)
    if operator in ("Gt", "Lt"):
        bound = _parse_int(values[0]) if len(values) == 1 else None
        actual = _parse_int(labels.get(key))
        if bound is None or actual is None:
            return False
        return actual > bound if operator == "Gt" else actual < bound
    return False


def _field_requirement_holds(expr: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """Evaluate one matchFields requirement; only ``metadata.name`` is a valid field."""
    if expr.get("key") != "metadata.name":
        return False
    name = (node.get("metadata") or {}).get("name", "")
    return _node_requirement_holds(expr, {"metadata.name": name})


def _term_matches(term: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """A NodeSelectorTerm: all expressions and all field requirements must hold."""
    expressions = term.get("matchExpressions") or ()
    fields = term.get("matchFields") or ()
    if not expressions and not fields:
        return False  # an empty term selects no node
    labels = (node.get("metadata") or {}).get("labels") or {}
    return all(_node_requirement_holds(e, labels) for e in expressions) and all(
        _field_requirement_holds(f, node) for f in fields
    )


def match_node_selector_terms(terms: Sequence[Mapping[str, Any]] | None,
                              node: Mapping[str, Any]) -> bool:
    """Return True when at least one of the (ORed) node selector terms matches ``node``."""
    return any(_term_matches(term, node) for term in terms or ())


def match_node_affinity(pv_node_affinity: Mapping[str, Any] | None,
                        node: Mapping[str, Any]) -> bool:
    """Check a PV's ``spec.nodeAffinity`` against a Node object dict.

    ``None`` (no affinity) and an affinity without ``required`` allow every node, as
    upstream's ``CheckNodeAffinity`` does. Otherwise the node must match one term of
    ``required.nodeSelectorTerms``.
    """
    if not pv_node_affinity:
        return True
    required = pv_node_affinity.get("required")
    if required is None:
        return True
    return match_node_selector_terms(required.get("nodeSelectorTerms"), node)
