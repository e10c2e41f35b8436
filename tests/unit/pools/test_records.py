"""The PV the pool provisioner creates for a claim (pools/records.build_pv)."""

from __future__ import annotations

from typing import Any

import pytest

from volplane.pools.records import build_pv


def _claim(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "data", "namespace": "ns", "uid": "u-1"},
            "spec": {"accessModes": ["ReadWriteOnce"], **spec}}


CLASS = {"metadata": {"name": "fast"}, "provisioner": "pool.volplane.io"}


@pytest.mark.parametrize(
    ("spec", "expect"),
    [
        pytest.param({"volumeAttributesClassName": "gold"}, "gold",
                     id="the claim's attributes class is passed through to the PV"),
        pytest.param({}, None, id="a claim without attributes class gets a PV without one"),
        pytest.param({"volumeAttributesClassName": None}, None,
                     id="a null attributes class is not written"),
    ],
)
def test_provisioned_pv_carries_the_claims_attributes_class(spec: dict, expect: str | None
                                                           ) -> None:
    pv = build_pv(_claim(**spec), CLASS, "pool-a", 1 << 30, {}, None)
    assert pv["spec"].get("volumeAttributesClassName") == expect
    assert pv["spec"]["storageClassName"] == "fast"
