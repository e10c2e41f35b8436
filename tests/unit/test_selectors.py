"""Label selectors (claims) and node affinity (PVs)."""

from __future__ import annotations

import pytest

from volplane.selectors import match_label_selector, match_node_affinity

LABELS = {"tier": "gold", "zone": "a", "size": "10"}


def expr(key: str, operator: str, *values: str) -> dict:
    out: dict = {"key": key, "operator": operator}
    if values:
        out["values"] = list(values)
    return out


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        (None, LABELS, True),
        ({}, LABELS, True),
        ({}, None, True),
        ({"matchLabels": {}}, {}, True),
        ({"matchLabels": {"tier": "gold"}}, LABELS, True),
        ({"matchLabels": {"tier": "silver"}}, LABELS, False),
        ({"matchLabels": {"tier": "gold", "zone": "b"}}, LABELS, False),
        ({"matchLabels": {"tier": "gold"}}, None, False),
        ({"matchExpressions": [expr("tier", "In", "gold", "silver")]}, LABELS, True),
        ({"matchExpressions": [expr("tier", "In", "silver")]}, LABELS, False),
        ({"matchExpressions": [expr("missing", "In", "x")]}, LABELS, False),
        ({"matchExpressions": [expr("tier", "NotIn", "silver")]}, LABELS, True),
        ({"matchExpressions": [expr("tier", "NotIn", "gold")]}, LABELS, False),
        ({"matchExpressions": [expr("missing", "NotIn", "x")]}, LABELS, True),
        ({"matchExpressions": [expr("zone", "Exists")]}, LABELS, True),
        ({"matchExpressions": [expr("missing", "Exists")]}, LABELS, False),
        ({"matchExpressions": [expr("missing", "DoesNotExist")]}, LABELS, True),
        ({"matchExpressions": [expr("zone", "DoesNotExist")]}, LABELS, False),
        (
            {"matchLabels": {"tier": "gold"}, "matchExpressions": [expr("zone", "In", "b")]},
            LABELS,
            False,
        ),
        (
            {
                "matchLabels": {"tier": "gold"},
                "matchExpressions": [expr("zone", "In", "a"), expr("x", "DoesNotExist")],
            },
            LABELS,
            True,
        ),
    ],
)
def test_label_selector(selector: dict | None, labels: dict | None, expected: bool) -> None:
    assert match_label_selector(selector, labels) is expected


def test_label_selector_unknown_operator() -> None:
    with pytest.raises(ValueError, match="Gt"):
        match_label_selector({"matchExpressions": [expr("size", "Gt", "1")]}, LABELS)


NODE = {"metadata": {"name": "node-1", "labels": LABELS}}


def affinity(*terms: dict) -> dict:
    return {"required": {"nodeSelectorTerms": list(terms)}}


def term(*expressions: dict, fields: tuple[dict, ...] = ()) -> dict:
    out: dict = {}
    if expressions:
        out["matchExpressions"] = list(expressions)
    if fields:
        out["matchFields"] = list(fields)
    return out


@pytest.mark.parametrize(
    ("pv_affinity", "expected"),
    [
        (None, True),
        ({}, True),
        ({"required": None}, True),
        (affinity(), False),  # no terms: nothing matches
        (affinity({}), False),  # empty term matches nothing
        (affinity(term(expr("zone", "In", "a"))), True),
        (affinity(term(expr("zone", "In", "b"))), False),
        (affinity(term(expr("zone", "In", "b")), term(expr("tier", "In", "gold"))), True),  # OR
        (affinity(term(expr("zone", "In", "a"), expr("tier", "In", "silver"))), False),  # AND
        (affinity(term(expr("zone", "NotIn", "b"))), True),
        (affinity(term(expr("zone", "Exists"))), True),
        (affinity(term(expr("nope", "DoesNotExist"))), True),
        (affinity(term(expr("size", "Gt", "9"))), True),
        (affinity(term(expr("size", "Gt", "10"))), False),
        (affinity(term(expr("size", "Lt", "11"))), True),
        (affinity(term(expr("size", "Lt", "10"))), False),
        (affinity(term(expr("zone", "Gt", "1"))), False),  # label not an integer
        (affinity(term(expr("size", "Gt", "x"))), False),  # bound not an integer
        (affinity(term(expr("size", "Gt", "1", "2"))), False),  # Gt needs one value
        (affinity(term(expr("zone", "In"))), False),  # In needs values
        (affinity(term(expr("zone", "Exists", "a"))), False),  # Exists takes none
        (affinity(term(expr("zone", "Bogus", "a"))), False),
        (affinity(term(fields=(expr("metadata.name", "In", "node-1"),))), True),
        (affinity(term(fields=(expr("metadata.name", "In", "node-2"),))), False),
        (affinity(term(fields=(expr("metadata.name", "NotIn", "node-2"),))), True),
        (affinity(term(fields=(expr("metadata.uid", "In", "node-1"),))), False),
        (
            affinity(
                term(expr("zone", "In", "a"), fields=(expr("metadata.name", "In", "node-2"),))
            ),
            False,
        ),
    ],
)
def test_node_affinity(pv_affinity: dict | None, expected: bool) -> None:
    assert match_node_affinity(pv_affinity, NODE) is expected


def test_node_affinity_node_without_labels() -> None:
    bare = {"metadata": {"name": "n"}}
    assert match_node_affinity(affinity(term(expr("zone", "DoesNotExist"))), bare)
    assert not match_node_affinity(affinity(term(expr("zone", "Exists"))), bare)
