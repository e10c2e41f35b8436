"""Upstream's names for attachments and volumes (volplane.attach.names)."""

from __future__ import annotations

import pytest

from volplane.attach import names as N


# -- names ---------------------------------------------------------------------------------
@pytest.mark.parametrize("handle,driver,node_name,want", [
    # sha256 of the concatenation, computed outside Python (printf '%s' ... | sha256sum)
    ("pool-a/pvc-1", "pool.volplane.io", "kwok-node-0",
     "csi-88b8e938e097142b887d41fc935607417f5939d108cc699234c4c87918382006"),
    ("vol-123", "ebs.csi.aws.com", "ip-10-0-0-1",
     "csi-7a3777897e100f1d265cd6a2f905d848d3d1f48b704ae0ab73eef21a2eb996be"),
])
def test_volume_attachment_name_is_upstreams(handle, driver, node_name, want):
    assert N.volume_attachment_name(handle, driver, node_name) == want


def test_unique_volume_name_round_trip():
    name = N.unique_volume_name("pool.volplane.io", "pool-a/pv-1")
    assert name == "kubernetes.io/csi/pool.volplane.io^pool-a/pv-1"
    assert N.parse_unique_volume_name(name) == ("pool.volplane.io", "pool-a/pv-1")
    assert N.parse_unique_volume_name("kubernetes.io/aws-ebs/vol-1") is None
