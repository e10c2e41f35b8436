"""The pool provisioner's verdict on claims that name a data source (external-provisioner's
rules: clones and snapshot restores are refused by a driver without them, any other kind
is left to its volume populator)."""

from __future__ import annotations

import pytest

from volplane.pools.records import data_source_verdict


def claim(ref: dict | None = None, legacy: dict | None = None) -> dict:
    spec: dict = {"resources": {"requests": {"storage": "1Gi"}}}
    if ref is not None:
        spec["dataSourceRef"] = ref
    if legacy is not None:
        spec["dataSource"] = legacy
    return {"metadata": {"name": "c", "namespace": "ns", "uid": "u"}, "spec": spec}


def test_no_data_source_is_provisioned():
    assert data_source_verdict(claim()) is None


@pytest.mark.parametrize("ref, word", [
    ({"kind": "PersistentVolumeClaim", "name": "src"}, "clone"),
    ({"apiGroup": "", "kind": "PersistentVolumeClaim", "name": "src"}, "clone"),
    ({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"},
     "snapshots"),
])
def test_clone_and_snapshot_are_refused_naming_the_source(ref, word):
    action, why = data_source_verdict(claim(ref))
    assert action == "unsupported"
    assert word in why and ref["name"] in why and "dataSourceRef" in why


def test_legacy_data_source_alone_is_read():
    action, _ = data_source_verdict(claim(legacy={"kind": "PersistentVolumeClaim", "name": "s"}))
    assert action == "unsupported"


@pytest.mark.parametrize("ref", [
    {"apiGroup": "hello.example.com", "kind": "Hello", "name": "h"},
    # a kind named like ours in another group is someone else's populator
    {"apiGroup": "example.com", "kind": "VolumeSnapshot", "name": "s"},
    {"apiGroup": "example.com", "kind": "PersistentVolumeClaim", "name": "s"},
])
def test_other_kinds_are_left_to_their_populator(ref):
    action, why = data_source_verdict(claim(ref))
    assert action == "populator"
    assert "populator" in why


def test_data_source_ref_wins_over_data_source():
    c = claim(ref={"apiGroup": "hello.example.com", "kind": "Hello", "name": "h"},
              legacy={"kind": "PersistentVolumeClaim", "name": "s"})
    assert data_source_verdict(c)[0] == "populator"
